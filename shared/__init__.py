"""Engine, data, training and evaluation shared by grow and prune."""
