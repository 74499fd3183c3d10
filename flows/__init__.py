"""Prefect flows and tasks: thin wiring around the `invoiceflow` domain package."""
