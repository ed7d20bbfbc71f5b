"""The lab: benchmark, tuning, calibration, experiments, skip-path search, metrics, plots and image grids.

Measuring tools for developers and the CLI; the runtime library (oracles, engine, loops, hosts) never imports them."""
