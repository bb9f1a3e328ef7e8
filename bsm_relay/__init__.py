"""bsm-relay: the mail gateway of a marketplace's buyer-seller messaging."""
