"""A site's own differential-privacy state and rules: the privacy ledger kept on the site's disk
(:mod:`.ledger`) and the site's policy from its node config (:mod:`.policy`). Flower-free."""

from .ledger import Ledger, LedgerError, dataset_fingerprint
from .policy import PrivacyRefused, SitePolicy

__all__ = ["Ledger", "LedgerError", "PrivacyRefused", "SitePolicy", "dataset_fingerprint"]
