"""Report sections: the built-in outline of the HTML report. Their templates live in
``medaudit/reports/templates/sections``."""
