#!/usr/bin/env python3
"""Django's command-line utility for administrative tasks."""

import os
import sys

if sys.version_info < (3, 12):
    sys.exit(
        "usage-dashboard needs Python 3.12 or newer (found %d.%d). "
        "Run `make demo`, or create the venv with python3.12+." % sys.version_info[:2]
    )


def main():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "usage_dashboard.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
