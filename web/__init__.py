"""Server-rendered pages (Jinja2, htmx for partial updates) mounted on the coordinator's app by the
`elmforest` command (elmforest_cli.create_app),
over the coordinator's service layer."""
