"""What the chapters share: the chapter helper, run grids and their runner, plots and tables, the
plateau rule, and chapter 05's full-scale setup."""
