"""Test helpers that ship with the package: a running gateway on free ports, fake parts."""
