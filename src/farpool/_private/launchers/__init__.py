"""Ways to start one cluster on the machines users already have (each ends in `farpool start`)."""
