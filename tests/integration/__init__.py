"""Tests on real processes: mosquitto, the cloud stub and the bridge."""
