"""Who may do what: Ed25519 keys, certificates and their chains, request and grant files,
a home's key store, the authority's and a device's certificate flows, receipts, revocations, scopes."""
