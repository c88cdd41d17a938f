"""`make bench`: run every benchmark with its defaults."""

from bench import enrollment

if __name__ == "__main__":
    enrollment.main([])
