"""SIP: message parsing and the screening proxy (``callguard serve``)."""
