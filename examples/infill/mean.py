def mean(data):
    """Return the sample arithmetic mean of data, a sequence of numbers."""
    n = len(data)
    if n < 1:
        raise ValueError("mean requires at least one data point")
<CURSOR>
    return total / n
