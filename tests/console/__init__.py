"""Tests of the web console in a real headless Chromium: the playground, the dashboard, the API-key prompt."""
