"""``zonex xborder``: cross-border data flows (数据跨境流动)."""
