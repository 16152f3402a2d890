"""A minimal Django project: settings (the rest is Django's defaults)."""

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "only-for-the-example")
DEBUG = False
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "testserver"]
ROOT_URLCONF = "mysite.urls"
TIME_ZONE = "UTC"
USE_TZ = True

RATES_REFRESH_SECONDS = float(os.environ.get("RATES_REFRESH_SECONDS", 30))
