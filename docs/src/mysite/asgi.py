import os

from django.core.asgi import get_asgi_application

from repeat_every import with_tasks

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
django_application = get_asgi_application()  # sets Django up: jobs may read the settings

from mysite.jobs import refresh_rates  # noqa: E402

application = with_tasks(django_application, refresh_rates)
