import os, perrequest
from celery import Celery
from perrequest import request_memo, ScopeStats
from perrequest.celery import install
from perrequest.testing import live_scopes
app = Celery("shop", broker="redis://127.0.0.1:/0", backend="redis://127.0.0.1:/1")
lookups = []
@request_memo
def unit_price(sku):
    lookups.append(sku); return {"apple": 3, "pear": 5}[sku]
closed = []
install(app, on_close=lambda s: closed.append(s.hits))
@app.task
def price_order(lines):
    before = len(lookups)
    total = sum(unit_price(s) * c for s, c in lines)
    return {"total": total, "lookups_this_task": len(lookups) - before, "in_scope": perrequest.in_request_scope()}
@app.task
def status():
    return {"in_scope": perrequest.in_request_scope(), "closed_hits": closed[-3:], "pid": os.getpid()}
