"""The leaf layer: settings, the error tree, domain types, reports, pure policies, phones, logging setup."""
