"""The Cornucopia services, one package each."""
