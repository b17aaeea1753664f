"""convtune service: REST API, job control over Ray Jobs, storage, and the command-line client."""
