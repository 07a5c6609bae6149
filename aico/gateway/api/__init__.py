"""REST domains (docs/rest.md): each has router.py, schemas.py, dependencies.py, exceptions.py."""
