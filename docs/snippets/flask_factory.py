"""Flask with an application factory: one PerRequest, several apps.

Run it: `python flask_factory.py`
"""

import perrequest
from flask import Flask
from perrequest.flask import PerRequest

per_request = PerRequest(max_entries=5_000)


def create_app() -> Flask:
    app = Flask(__name__)
    per_request.init_app(app)

    @app.get("/bound")
    def bound() -> str:
        return str(perrequest.current_store().max_entries)

    return app


if __name__ == "__main__":
    for app in (create_app(), create_app()):
        with app.test_client().get("/bound") as response:
            assert response.text == "5000"
