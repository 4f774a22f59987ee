"""Helpers shared by the tests (imported as `helpers.<subject>`; fixtures live in the conftest.py of each folder).

  training.py    tiny experiment configs, reading checkpoint weights, comparing state dicts
  evaluation.py  random Inception weights, PNG folders, tiny checkpoints written without training
  reports.py     runs logged into MLflow in the layout training and evaluation use
  browser.py     headless Chromium over the DevTools protocol
"""
