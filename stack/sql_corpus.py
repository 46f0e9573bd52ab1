"""A deterministic text-to-SQL corpus over a small bundled shop schema (standard library only).

    >>> from stack.sql_corpus import SCHEMA, pairs
    >>> p = pairs(3, seed=0)[0]
    >>> p.question, p.sql

Questions are generated from templates that vary the table, columns, filters, aggregates,
joins, grouping, ordering and limits; every answer is valid SQLite over SCHEMA (a unit test
runs each one). The local stand-in models are trained on these pairs and the load test draws
its prompts from them, so the same (n, seed) always gives the same list.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import NamedTuple

# Bump when the templates or value lists change: the local model builder records it in its
# stamp, so a changed corpus rebuilds the trained models.
CORPUS_VERSION = 1

SCHEMA = """\
CREATE TABLE customers (
  id INTEGER PRIMARY KEY,
  name TEXT NOT NULL,
  email TEXT NOT NULL,
  city TEXT NOT NULL,
  country TEXT NOT NULL,
  segment TEXT NOT NULL,          -- 'consumer', 'business' or 'enterprise'
  signup_date DATE NOT NULL
);
CREATE TABLE products (
  id INTEGER PRIMARY KEY,
  name TEXT NOT NULL,
  category TEXT NOT NULL,
  price REAL NOT NULL,
  stock INTEGER NOT NULL
);
CREATE TABLE orders (
  id INTEGER PRIMARY KEY,
  customer_id INTEGER NOT NULL REFERENCES customers(id),
  order_date DATE NOT NULL,
  status TEXT NOT NULL,           -- 'pending', 'paid', 'shipped', 'delivered' or 'cancelled'
  total REAL NOT NULL
);
CREATE TABLE order_items (
  id INTEGER PRIMARY KEY,
  order_id INTEGER NOT NULL REFERENCES orders(id),
  product_id INTEGER NOT NULL REFERENCES products(id),
  quantity INTEGER NOT NULL,
  unit_price REAL NOT NULL
);
"""

TABLES = ("customers", "products", "orders", "order_items")

CITIES = {
    "Paris": "France", "Lyon": "France", "Berlin": "Germany", "Munich": "Germany",
    "Madrid": "Spain", "Barcelona": "Spain", "Rome": "Italy", "Milan": "Italy",
    "London": "United Kingdom", "Manchester": "United Kingdom", "Boston": "USA",
    "Chicago": "USA", "Seattle": "USA", "Toronto": "Canada", "Tokyo": "Japan",
    "Osaka": "Japan", "Sydney": "Australia", "Amsterdam": "Netherlands",
}
COUNTRIES = tuple(sorted(set(CITIES.values())))
SEGMENTS = ("consumer", "business", "enterprise")
CATEGORIES = ("Books", "Electronics", "Toys", "Garden", "Kitchen", "Sports", "Clothing", "Music")
STATUSES = ("pending", "paid", "shipped", "delivered", "cancelled")
MONTHS = (
    ("January", "01", "31"), ("February", "02", "28"), ("March", "03", "31"),
    ("April", "04", "30"), ("May", "05", "31"), ("June", "06", "30"), ("July", "07", "31"),
    ("August", "08", "31"), ("September", "09", "30"), ("October", "10", "31"),
    ("November", "11", "30"), ("December", "12", "31"),
)
YEARS = ("2022", "2023", "2024", "2025")
PRICES = (5, 10, 20, 25, 50, 75, 100, 150, 200, 500)
TOTALS = (50, 100, 200, 250, 500, 1000, 2000)
STOCKS = (0, 5, 10, 20, 50, 100)
QUANTITIES = (2, 3, 5, 10, 20)
LIMITS = (1, 3, 5, 10, 20)
COUNTS = (1, 2, 3, 5, 10, 20)


class Pair(NamedTuple):
    question: str
    sql: str


# --- the pieces templates choose from --------------------------------------------------------

_LIST = ("List", "Show", "Give me", "Find", "Return", "Get", "Display")
_HOW_MANY = ("How many", "Count the number of", "What is the number of")

# (question words, column) that can be shown per table
_SHOW = {
    "customers": (("names", "name"), ("emails", "email"), ("names and emails", "name, email"),
                  ("names and cities", "name, city"), ("ids", "id")),
    "products": (("names", "name"), ("names and prices", "name, price"),
                 ("names and categories", "name, category"), ("ids", "id"),
                 ("names and stock levels", "name, stock")),
    "orders": (("ids", "id"), ("ids and totals", "id, total"), ("dates", "order_date"),
               ("ids and statuses", "id, status"), ("totals", "total")),
}
_NOUN = {"customers": "customers", "products": "products", "orders": "orders"}


def _filter(rng: random.Random, table: str, alias: str = "") -> tuple[str, str]:
    """One WHERE condition for `table`: (phrase, sql). Phrases read after the noun."""
    a = f"{alias}." if alias else ""
    if table == "customers":
        kind = rng.randrange(5)
        if kind == 0:
            city = rng.choice(tuple(CITIES))
            return f"in {city}", f"{a}city = '{city}'"
        if kind == 1:
            country = rng.choice(COUNTRIES)
            return f"from {country}", f"{a}country = '{country}'"
        if kind == 2:
            seg = rng.choice(SEGMENTS)
            return f"in the {seg} segment", f"{a}segment = '{seg}'"
        year = rng.choice(YEARS)
        if kind == 3:
            return f"who signed up in {year}", f"{a}signup_date BETWEEN '{year}-01-01' AND " \
                                              f"'{year}-12-31'"
        return f"who signed up before {year}", f"{a}signup_date < '{year}-01-01'"
    if table == "products":
        kind = rng.randrange(5)
        if kind == 0:
            cat = rng.choice(CATEGORIES)
            return f"in the {cat} category", f"{a}category = '{cat}'"
        if kind == 1:
            p = rng.choice(PRICES)
            return f"that cost more than {p}", f"{a}price > {p}"
        if kind == 2:
            p = rng.choice(PRICES)
            return f"cheaper than {p}", f"{a}price < {p}"
        if kind == 3:
            return "that are out of stock", f"{a}stock = 0"
        s = rng.choice(STOCKS[1:])
        return f"with fewer than {s} units in stock", f"{a}stock < {s}"
    if table == "orders":
        kind = rng.randrange(5)
        if kind == 0:
            st = rng.choice(STATUSES)
            return f"with status '{st}'", f"{a}status = '{st}'"
        if kind == 1:
            t = rng.choice(TOTALS)
            return f"with a total above {t}", f"{a}total > {t}"
        year = rng.choice(YEARS)
        if kind == 2:
            return f"placed in {year}", f"{a}order_date BETWEEN '{year}-01-01' AND '{year}-12-31'"
        if kind == 3:
            month, mm, last = rng.choice(MONTHS)
            return (f"placed in {month} {year}",
                    f"{a}order_date BETWEEN '{year}-{mm}-01' AND '{year}-{mm}-{last}'")
        month, mm, _ = rng.choice(MONTHS)
        return f"placed after {year}-{mm}-01", f"{a}order_date > '{year}-{mm}-01'"
    raise ValueError(table)


# --- templates: each returns one Pair ---------------------------------------------------------

def _select_all(rng: random.Random) -> Pair:
    table = rng.choice(("customers", "products", "orders"))
    verb = rng.choice(_LIST)
    if rng.random() < 0.3:
        return Pair(f"{verb} all {_NOUN[table]}.", f"SELECT * FROM {table};")
    words, cols = rng.choice(_SHOW[table])
    return Pair(f"{verb} the {words} of all {_NOUN[table]}.", f"SELECT {cols} FROM {table};")


def _select_where(rng: random.Random) -> Pair:
    table = rng.choice(("customers", "products", "orders"))
    words, cols = rng.choice(_SHOW[table])
    phrase, cond = _filter(rng, table)
    if rng.random() < 0.5:
        phrase2, cond2 = _filter(rng, table)
        if cond2.split()[0] != cond.split()[0]:
            phrase, cond = f"{phrase} and {phrase2}", f"{cond} AND {cond2}"
    verb = rng.choice(_LIST)
    return Pair(f"{verb} the {words} of {_NOUN[table]} {phrase}.",
                f"SELECT {cols} FROM {table} WHERE {cond};")


def _count(rng: random.Random) -> Pair:
    table = rng.choice(("customers", "products", "orders"))
    how = rng.choice(_HOW_MANY)
    if rng.random() < 0.25:
        q = f"{how} {_NOUN[table]}" + {"How many": " are there?", "Count the number of": "."}\
            .get(how, "?")
        return Pair(q, f"SELECT COUNT(*) FROM {table};")
    phrase, cond = _filter(rng, table)
    if how == "How many":
        q = f"How many {_NOUN[table]} are there {phrase}?"
    else:
        q = f"{how} {_NOUN[table]} {phrase}" + ("." if how.startswith("Count") else "?")
    return Pair(q, f"SELECT COUNT(*) FROM {table} WHERE {cond};")


_AGG = (("average", "AVG"), ("total", "SUM"), ("highest", "MAX"), ("lowest", "MIN"))
_MEASURE = {"products": (("price", "price"), ("stock", "stock")),
            "orders": (("order total", "total"),)}


def _aggregate(rng: random.Random) -> Pair:
    table = rng.choice(("products", "orders"))
    word, fn = rng.choice(_AGG)
    mword, col = rng.choice(_MEASURE[table])
    what = f"What is the {word} {mword}"
    if rng.random() < 0.3:
        return Pair(f"{what} of all {_NOUN[table]}?", f"SELECT {fn}({col}) FROM {table};")
    phrase, cond = _filter(rng, table)
    return Pair(f"{what} of {_NOUN[table]} {phrase}?",
                f"SELECT {fn}({col}) FROM {table} WHERE {cond};")


_ORDERABLE = {
    "products": (("most expensive", "price DESC", "name, price"),
                 ("cheapest", "price ASC", "name, price"),
                 ("best stocked", "stock DESC", "name, stock")),
    "orders": (("largest", "total DESC", "id, total"), ("smallest", "total ASC", "id, total"),
               ("most recent", "order_date DESC", "id, order_date"),
               ("oldest", "order_date ASC", "id, order_date")),
    "customers": (("most recently signed up", "signup_date DESC", "name, signup_date"),
                  ("earliest", "signup_date ASC", "name, signup_date")),
}


def _top_n(rng: random.Random) -> Pair:
    table = rng.choice(tuple(_ORDERABLE))
    word, order, cols = rng.choice(_ORDERABLE[table])
    n = rng.choice(LIMITS)
    what = f"{n} {word} {_NOUN[table]}" if n > 1 else f"{word} {_NOUN[table][:-1]}"
    if rng.random() < 0.4:
        phrase, cond = _filter(rng, table)
        return Pair(f"{rng.choice(_LIST)} the {what} {phrase}.",
                    f"SELECT {cols} FROM {table} WHERE {cond} ORDER BY {order} LIMIT {n};")
    return Pair(f"{rng.choice(_LIST)} the {what}.",
                f"SELECT {cols} FROM {table} ORDER BY {order} LIMIT {n};")


def _sorted(rng: random.Random) -> Pair:
    table = rng.choice(tuple(_ORDERABLE))
    words, cols = rng.choice(_SHOW[table])
    col, desc = {
        "customers": ("name", rng.random() < 0.3),
        "products": (rng.choice(("price", "name")), rng.random() < 0.5),
        "orders": (rng.choice(("order_date", "total")), rng.random() < 0.5),
    }[table]
    way = "descending" if desc else "ascending"
    nice = col.replace("_", " ")
    return Pair(f"{rng.choice(_LIST)} the {words} of all {_NOUN[table]} sorted by {nice} {way}.",
                f"SELECT {cols} FROM {table} ORDER BY {col} {'DESC' if desc else 'ASC'};")


_GROUPS = {
    "customers": (("country", "country"), ("city", "city"), ("segment", "segment")),
    "products": (("category", "category"),),
    "orders": (("status", "status"),),
}


def _group_count(rng: random.Random) -> Pair:
    table = rng.choice(tuple(_GROUPS))
    word, col = rng.choice(_GROUPS[table])
    if rng.random() < 0.3:
        n = rng.choice(COUNTS)
        return Pair(f"Which {word} values have more than {n} {_NOUN[table]}?"
                    if word in ("status", "segment") else
                    f"Which {'countries' if word == 'country' else word + 's'} have more than "
                    f"{n} {_NOUN[table]}?",
                    f"SELECT {col} FROM {table} GROUP BY {col} HAVING COUNT(*) > {n};")
    q = rng.choice((f"How many {_NOUN[table]} are there in each {word}?",
                    f"Count the {_NOUN[table]} per {word}.",
                    f"Show the number of {_NOUN[table]} for every {word}."))
    sql = f"SELECT {col}, COUNT(*) FROM {table} GROUP BY {col}"
    if rng.random() < 0.4:
        q = q[:-1] + ", largest first" + q[-1]
        sql += " ORDER BY COUNT(*) DESC"
    return Pair(q, sql + ";")


def _group_agg(rng: random.Random) -> Pair:
    if rng.random() < 0.5:
        word, fn = rng.choice(_AGG)
        return Pair(f"What is the {word} price of products in each category?",
                    f"SELECT category, {fn}(price) FROM products GROUP BY category;")
    word, fn = rng.choice(_AGG)
    return Pair(f"What is the {word} order total for each status?",
                f"SELECT status, {fn}(total) FROM orders GROUP BY status;")


def _join_orders_customers(rng: random.Random) -> Pair:
    phrase, cond = _filter(rng, "customers", "c")
    kind = rng.randrange(4)
    if kind == 0:
        return Pair(f"{rng.choice(_LIST)} the orders placed by customers {phrase}.",
                    "SELECT o.id, o.order_date, o.total FROM orders o JOIN customers c "
                    f"ON o.customer_id = c.id WHERE {cond};")
    if kind == 1:
        return Pair(f"How many orders were placed by customers {phrase}?",
                    "SELECT COUNT(*) FROM orders o JOIN customers c ON o.customer_id = c.id "
                    f"WHERE {cond};")
    if kind == 2:
        ophrase, ocond = _filter(rng, "orders", "o")
        return Pair(f"{rng.choice(_LIST)} the customer names and order ids for orders {ophrase}.",
                    "SELECT c.name, o.id FROM orders o JOIN customers c ON o.customer_id = c.id "
                    f"WHERE {ocond};")
    return Pair(f"What is the total amount spent by customers {phrase}?",
                "SELECT SUM(o.total) FROM orders o JOIN customers c ON o.customer_id = c.id "
                f"WHERE {cond};")


def _join_group(rng: random.Random) -> Pair:
    kind = rng.randrange(4)
    if kind == 0:
        n = rng.choice(LIMITS[1:])
        return Pair(f"Who are the top {n} customers by total spending?",
                    "SELECT c.name, SUM(o.total) AS spent FROM customers c JOIN orders o "
                    f"ON o.customer_id = c.id GROUP BY c.id, c.name ORDER BY spent DESC "
                    f"LIMIT {n};")
    if kind == 1:
        return Pair("How many orders has each customer placed?",
                    "SELECT c.name, COUNT(o.id) FROM customers c LEFT JOIN orders o "
                    "ON o.customer_id = c.id GROUP BY c.id, c.name;")
    if kind == 2:
        n = rng.choice(COUNTS)
        return Pair(f"Which customers have placed more than {n} orders?",
                    "SELECT c.name FROM customers c JOIN orders o ON o.customer_id = c.id "
                    f"GROUP BY c.id, c.name HAVING COUNT(o.id) > {n};")
    return Pair("What is the total revenue per country?",
                "SELECT c.country, SUM(o.total) FROM orders o JOIN customers c "
                "ON o.customer_id = c.id GROUP BY c.country;")


def _join_items(rng: random.Random) -> Pair:
    kind = rng.randrange(5)
    if kind == 0:
        phrase, cond = _filter(rng, "customers", "c")
        return Pair(f"Which products were ordered by customers {phrase}?",
                    "SELECT DISTINCT p.name FROM products p JOIN order_items oi "
                    "ON oi.product_id = p.id JOIN orders o ON o.id = oi.order_id "
                    f"JOIN customers c ON c.id = o.customer_id WHERE {cond};")
    if kind == 1:
        n = rng.choice(LIMITS[1:])
        return Pair(f"What are the {n} best-selling products by quantity?",
                    "SELECT p.name, SUM(oi.quantity) AS sold FROM products p JOIN order_items oi "
                    f"ON oi.product_id = p.id GROUP BY p.id, p.name ORDER BY sold DESC LIMIT {n};")
    if kind == 2:
        return Pair("What is the revenue for each product category?",
                    "SELECT p.category, SUM(oi.quantity * oi.unit_price) FROM order_items oi "
                    "JOIN products p ON p.id = oi.product_id GROUP BY p.category;")
    if kind == 3:
        q = rng.choice(QUANTITIES)
        return Pair(f"{rng.choice(_LIST)} the order ids that contain more than {q} units "
                    "of a single product.",
                    f"SELECT DISTINCT order_id FROM order_items WHERE quantity > {q};")
    cat = rng.choice(CATEGORIES)
    return Pair(f"How many units of {cat} products have been sold?",
                "SELECT SUM(oi.quantity) FROM order_items oi JOIN products p "
                f"ON p.id = oi.product_id WHERE p.category = '{cat}';")


def _distinct(rng: random.Random) -> Pair:
    col, table, words = rng.choice((
        ("city", "customers", "cities our customers live in"),
        ("country", "customers", "countries we have customers in"),
        ("category", "products", "product categories"),
        ("status", "orders", "order statuses"),
    ))
    if rng.random() < 0.5:
        return Pair(f"{rng.choice(_LIST)} the distinct {words}.",
                    f"SELECT DISTINCT {col} FROM {table};")
    return Pair(f"How many different {words} are there?",
                f"SELECT COUNT(DISTINCT {col}) FROM {table};")


def _never(rng: random.Random) -> Pair:
    if rng.random() < 0.5:
        return Pair("Which customers have never placed an order?",
                    "SELECT name FROM customers WHERE id NOT IN "
                    "(SELECT customer_id FROM orders);")
    return Pair("Which products have never been ordered?",
                "SELECT name FROM products WHERE id NOT IN (SELECT product_id FROM order_items);")


# (template, weight): simple shapes are more frequent than joins, as in real traffic
TEMPLATES: tuple[tuple[Callable[[random.Random], Pair], int], ...] = (
    (_select_all, 2), (_select_where, 5), (_count, 4), (_aggregate, 3), (_top_n, 3),
    (_sorted, 2), (_group_count, 3), (_group_agg, 1), (_join_orders_customers, 3),
    (_join_group, 2), (_join_items, 2), (_distinct, 1), (_never, 1),
)


def iter_pairs(seed: int = 0) -> Iterator[Pair]:
    """An endless, deterministic stream of pairs for `seed`."""
    rng = random.Random(seed)
    funcs = [f for f, _ in TEMPLATES]
    weights = [w for _, w in TEMPLATES]
    while True:
        yield rng.choices(funcs, weights)[0](rng)


def pairs(n: int, seed: int = 0) -> list[Pair]:
    """The first `n` pairs for `seed` (duplicates possible: a few shapes have few variants)."""
    if n < 0:
        raise ValueError("n must be >= 0")
    it = iter_pairs(seed)
    return [next(it) for _ in range(n)]


def schema() -> str:
    """The CREATE TABLE statements the answers refer to."""
    return SCHEMA


if __name__ == "__main__":  # python -m stack.sql_corpus [N] [SEED]: print a sample
    import sys

    args = [int(a) for a in sys.argv[1:3]]
    for p in pairs(args[0] if args else 10, args[1] if len(args) > 1 else 0):
        print(f"Q: {p.question}\nA: {p.sql}\n")
