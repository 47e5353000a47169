"""``zonex console``: the auditor's and operator's local web console."""
