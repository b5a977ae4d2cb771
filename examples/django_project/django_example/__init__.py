"""The example project's package; see ../manage.py for what it shows and how to run it."""
