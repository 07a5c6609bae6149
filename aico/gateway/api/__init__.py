"""REST domains (SPEC §7): each has router.py, schemas.py, dependencies.py, exceptions.py."""
