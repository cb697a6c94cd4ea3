"""Study grids from YAML: runner (local or Ray) and reports."""
