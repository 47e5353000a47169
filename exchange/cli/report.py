"""``zonex report``: monthly and quarterly reports (月报季评) computed from a verified bundle."""
