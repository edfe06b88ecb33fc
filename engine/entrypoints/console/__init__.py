"""The web console: a single page served at `GET /` (static files in `static/`, shipped with the
package: no CDN, no build step), fed by one JSON endpoint, `GET /v1/cluster/status`.

- `status.py`: the status document (one shape from the standalone server and the Ray ingress);
- `routes.py`: the endpoint and the static files, added to the OpenAI app by `build_app`.

The page itself is public (it asks for the API key and sends it as a Bearer header); the status
endpoint is an API route, authenticated like inference. `--disable-console` turns the page off and
keeps the endpoint.
"""
