"""The coordinator: accounts, domains, forests and versions, branch inits, contributions,
artifact storage, jobs and the REST API. Stands on btm; the web pages stand on it."""
