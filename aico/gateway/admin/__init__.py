"""The admin site: its own listener (``[admin]``, loopback), Klein site, sessions and API.

* :mod:`~aico.gateway.admin.hosts` — the DNS-rebinding guard (``Host`` must be a loopback
  name or an allowed host), shared with the ``http`` listener;
* :mod:`~aico.gateway.admin.sessions` — browser sessions (cookie + CSRF token);
* :mod:`~aico.gateway.admin.logbuffer` — the recent log lines the API shows;
* :mod:`~aico.gateway.admin.api` — every ``/admin/api/…`` route;
* :mod:`~aico.gateway.admin.site` — the site itself (``docs/admin.md``).
"""
