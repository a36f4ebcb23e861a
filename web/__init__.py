"""Server-rendered pages (Jinja2, htmx for partial updates) mounted by the coordinator app,
over the coordinator's service layer."""
