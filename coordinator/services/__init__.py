"""The logic the API, the web pages and the jobs share: one module per resource. Functions
take a Session and do not commit; the caller's transaction decides."""
