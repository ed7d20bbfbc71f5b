"""Host integrations, one module per host; none imports another. A host module imports its host lazily (the
host passes its classes in), so each is testable without the host installed."""
