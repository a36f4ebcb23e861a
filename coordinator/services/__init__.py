"""The logic the API, the web pages and the jobs share: one module per resource. Functions
take a Session and, as a rule, do not commit: the caller's transaction decides. These commit
on purpose:

- jobs.py: the runner's claim, heartbeat, outcome, requeue and failure, the hand-back at
  shutdown and the recovery sweep each commit a short transaction of their own, so other
  processes see a job's state at once (a job's outcome commits together with its work).
- uploads.py: `complete` ends the transaction before the slow assembling and hashing (its
  connection goes back to the pool meanwhile); an upload found expired, or not what was
  declared, is deleted and committed before the error is raised, so it stays deleted
  whatever the caller does next.
- contributions.py: validation commits the move to `validating` before its slow checks.
- users.py: `authenticate` commits a failed login's count although the request fails; the
  last use of tokens is written by a background thread in transactions of its own.
"""
