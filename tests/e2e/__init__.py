"""End-to-end tests of callguard serve with real SIP peers over loopback."""
