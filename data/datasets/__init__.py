"""One module per dataset; each registers itself with @register_dataset."""
