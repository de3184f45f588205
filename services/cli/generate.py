"""Synthetic raw events for demos, tests and benchmarks, labelled with where each should land.

Every generated record carries a `kind` saying what the pipeline is expected to do with it,
so a test or the demo can predict the counts on each topic:

- ``valid``: a well-formed event of a known, non-test user -> pipeline.validated
- ``duplicate``: the exact bytes of an earlier ``valid`` event -> dropped and counted by dedup
- ``invalid:parse_error``: not UTF-8 or not JSON -> pipeline.dlq (parse_error)
- ``invalid:schema_violation``: JSON that breaks the raw contract -> pipeline.dlq (schema_violation)
- ``invalid:policy_denied``: an unknown source, or a type the source may not emit -> pipeline.dlq
- ``test_user``: a valid event of a test user (u00951+) -> filtered by rule in the processor
- ``unknown_user``: a valid event of a user missing from the users table -> enrichment decides
- ``heartbeat``: a ``heartbeat``/``debug`` event of a known user -> filtered by rule

Generation is deterministic for a given seed and start time, and fast (orjson, a single
`random.Random`, precomputed vocabularies): the generator must outrun `pipectl produce`.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson

from services.common.sample_users import FIRST_TEST_USER, SAMPLE_USER_COUNT, sample_user_id

# The raw contract: which source may emit which event types (the message-level policy in
# OPA is the authority; this mirrors it so generated "valid" events really are allowed).
SOURCE_EVENT_TYPES: dict[str, tuple[str, ...]] = {
    "web": (
        "page_view",
        "click",
        "search",
        "signup",
        "login",
        "logout",
        "add_to_cart",
        "purchase",
        "heartbeat",
        "debug",
        "user_signup",
        "user_login",
        "user_logout",
    ),
    "mobile": (
        "app_open",
        "screen_view",
        "click",
        "login",
        "logout",
        "add_to_cart",
        "purchase",
        "push_open",
        "heartbeat",
        "debug",
        "user_signup",
        "user_login",
        "user_logout",
        "page_view",
    ),
    "backend": (
        "signup",
        "purchase",
        "refund",
        "subscription_started",
        "subscription_cancelled",
        "payment_failed",
        "heartbeat",
        "debug",
        "user_signup",
        "user_login",
        "user_logout",
        "page_view",
    ),
}
NOISE_TYPES = ("heartbeat", "debug")
ALL_EVENT_TYPES = frozenset(t for types in SOURCE_EVENT_TYPES.values() for t in types)
RAW_FIELDS = ("event_id", "event_type", "timestamp", "user_id", "properties", "source")
# The fields an event cannot do without: `source` is optional, the raw topic names it.
REQUIRED_FIELDS = tuple(f for f in RAW_FIELDS if f != "source")

KINDS = (
    "valid",
    "duplicate",
    "invalid:parse_error",
    "invalid:schema_violation",
    "invalid:policy_denied",
    "test_user",
    "unknown_user",
    "heartbeat",
)
# How the invalid fraction splits between the three ways of being invalid.
INVALID_SPLIT = (
    ("invalid:parse_error", 0.3),
    ("invalid:schema_violation", 0.4),
    ("invalid:policy_denied", 0.3),
)
# Heartbeats are operational noise every real source sends; a small fixed share of traffic.
DEFAULT_HEARTBEAT_FRACTION = 0.02
# Distinct property objects kept per (source, event type); see _Builder.props.
PROPERTY_POOL = 256
# Duplicates repeat one of the most recent valid events, as a retrying client would; a
# bounded window also keeps memory flat for any n.
DUPLICATE_WINDOW = 1000

# Traffic mix: web dominates, backend events are rarer but carry the money.
SOURCE_WEIGHTS = (("web", 0.5), ("mobile", 0.35), ("backend", 0.15))
TYPE_WEIGHTS: dict[str, dict[str, int]] = {
    "web": {
        "page_view": 45,
        "click": 20,
        "search": 10,
        "signup": 2,
        "login": 6,
        "logout": 3,
        "add_to_cart": 9,
        "purchase": 5,
    },
    "mobile": {
        "app_open": 15,
        "screen_view": 35,
        "click": 20,
        "login": 5,
        "logout": 2,
        "add_to_cart": 10,
        "purchase": 5,
        "push_open": 8,
    },
    "backend": {
        "signup": 15,
        "purchase": 30,
        "refund": 8,
        "subscription_started": 15,
        "subscription_cancelled": 8,
        "payment_failed": 24,
    },
}
# Offsets each source's clocks report in: browsers and phones in their users' zones,
# backends in UTC ("Z" is RFC 3339's spelling of +00:00).
SOURCE_ZONES: dict[str, tuple[timezone, ...]] = {
    "web": tuple(timezone(timedelta(hours=h)) for h in (1, 1, 2, 0, -5, -8, 9, 5.5)),
    "mobile": tuple(timezone(timedelta(hours=h)) for h in (1, 2, -3, -6, 8, 10)),
    "backend": (UTC,),
}

PRODUCTS = tuple(
    (f"p-{n:05d}", name, category, price)
    for n, (name, category, price) in enumerate(
        [
            ("Trail running shoes", "footwear", 129.9),
            ("Merino wool socks", "apparel", 19.5),
            ("Insulated jacket", "apparel", 249.0),
            ("Espresso machine", "kitchen", 399.99),
            ("Burr coffee grinder", "kitchen", 89.0),
            ("Noise cancelling headphones", "electronics", 299.0),
            ("USB-C charger 65W", "electronics", 39.99),
            ("Mechanical keyboard", "electronics", 149.0),
            ("Yoga mat", "sports", 34.95),
            ("Steel water bottle", "sports", 24.0),
            ("Hardcover notebook", "stationery", 14.9),
            ("Fountain pen", "stationery", 59.0),
            ("Cast iron skillet", "kitchen", 44.5),
            ("Desk lamp", "home", 69.0),
            ("Linen bedsheet set", "home", 119.0),
            ("Backpack 28L", "travel", 95.0),
        ],
        start=1001,
    )
)
CATEGORIES = tuple(sorted({p[2] for p in PRODUCTS}))
PAGES = (
    "/",
    "/products",
    "/products/{pid}",
    "/category/{cat}",
    "/cart",
    "/checkout",
    "/account",
    "/help/shipping",
    "/blog/how-we-roast",
    "/search",
)
REFERRERS = (
    "https://www.google.com/",
    "https://duckduckgo.com/",
    "https://news.ycombinator.com/",
    "https://www.instagram.com/",
    "https://shop.example.com/",
    "",
    "https://t.co/abc123",
)
UTM = (
    {"source": "newsletter", "medium": "email", "campaign": "black-friday"},
    {"source": "google", "medium": "cpc", "campaign": "brand"},
    {"source": "instagram", "medium": "social", "campaign": "winter-drop"},
    None,
    None,
    None,
)
USER_AGENTS = (
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_6) AppleWebKit/605.1.15 Safari/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/131.0 Safari/537.36",
)
LOCALES = ("en-GB", "de-DE", "fr-FR", "en-US", "es-ES", "ja-JP", "pt-BR")
DEVICES = (
    ("iPhone15,3", "iOS", "18.1"),
    ("Pixel 8", "Android", "15"),
    ("SM-S918B", "Android", "14"),
    ("iPhone13,2", "iOS", "17.6"),
)
SCREENS = ("home", "product_detail", "cart", "checkout", "search_results", "profile", "orders")
QUERIES = (
    "running shoes",
    "coffee grinder",
    "wool socks size 42",
    "usb c charger",
    "gift ideas",
    "yoga mat non slip",
    "jacket waterproof",
)
BUTTONS = (
    ("btn-add-to-cart", "Add to cart"),
    ("nav-search", "Search"),
    ("btn-checkout", "Checkout"),
    ("link-product", "View product"),
    ("btn-newsletter", "Subscribe"),
)
PLANS = (("basic", 9.0), ("pro", 29.0), ("team", 99.0))
CURRENCIES = ("EUR", "EUR", "EUR", "USD", "GBP")
COUNTRIES = ("DE", "FR", "NL", "GB", "US", "ES", "AT")
DECLINE_CODES = ("insufficient_funds", "card_expired", "do_not_honor", "authentication_required")


# Not frozen: a frozen dataclass's __init__ goes through object.__setattr__ per field, a
# measurable share of the generator's time.
@dataclass(slots=True)
class GeneratedEvent:
    key: bytes
    value: bytes
    kind: str
    # The source whose raw topic the record belongs on (pipeline.raw.<source>): the source
    # it claims, or for a claim of a source nobody registered, the one that sent it.
    source: str = "web"


def _cumulative(
    pairs: tuple[tuple[str, float], ...] | list[tuple[str, float]],
) -> tuple[list[str], list[float]]:
    total = sum(w for _, w in pairs)
    names, bounds, acc = [], [], 0.0
    for name, weight in pairs:
        acc += weight / total
        names.append(name)
        bounds.append(acc)
    bounds[-1] = 1.0  # float sums may fall short of 1; the last bucket takes the rest
    return names, bounds


class _Builder:
    """Builds one event dict at a time; holds the RNG and the hot-path lookups."""

    def __init__(self, rng: random.Random, start: datetime, n: int, source: str | None = None) -> None:
        self.random = rng.random
        self.getrandbits = rng.getrandbits
        # Events are spread over the time just before `start`, 0-10 ms apart, in order:
        # realistic recent traffic, never after `start` (a clock-skew check may reject events
        # from the future), so the clock starts the largest possible total gap before it.
        self.clock_ms = int(start.timestamp() * 1000) - n * 10
        # One source only: every event is one that source could send (its own topic).
        self.sources = _cumulative(SOURCE_WEIGHTS if source is None else ((source, 1.0),))
        self.source_names = tuple(SOURCE_EVENT_TYPES) if source is None else (source,)
        self.types = {s: _cumulative(list(w.items())) for s, w in TYPE_WEIGHTS.items()}
        self.properties: dict[str, Callable[[str], dict[str, Any]]] = {
            "page_view": self._page_view,
            "click": self._click,
            "search": self._search,
            "signup": self._signup,
            "login": self._login,
            "logout": self._logout,
            "add_to_cart": self._add_to_cart,
            "purchase": self._purchase,
            "refund": self._refund,
            "subscription_started": self._subscription_started,
            "subscription_cancelled": self._subscription_cancelled,
            "payment_failed": self._payment_failed,
            "app_open": self._app_open,
            "screen_view": self._screen_view,
            "push_open": self._push_open,
            "heartbeat": self._heartbeat,
            "debug": self._debug,
        }
        self.pools: dict[tuple[str, str], list[tuple[dict[str, Any], str]]] = {}
        self.zones = {
            source: [
                (z, "Z" if source == "backend" else datetime.fromtimestamp(0, z).isoformat()[-6:])
                for z in zones
            ]
            for source, zones in SOURCE_ZONES.items()
        }
        self.ts_second = -1
        self.ts_prefixes: dict[str, str] = {}

    # random.Random.choice/randint go through _randbelow (several Python calls each); one
    # float draw scaled to the range is 4-5x cheaper and just as deterministic.
    def choice(self, seq: Any) -> Any:
        return seq[int(self.random() * len(seq))]

    def randint(self, low: int, high: int) -> int:
        return low + int(self.random() * (high - low + 1))

    # ---- the six fields -----------------------------------------------------------------

    def pick(self, table: tuple[list[str], list[float]]) -> str:
        names, bounds = table
        return names[bisect_right(bounds, self.random())]

    def event_id(self) -> str:
        # A random (version 4, RFC 4122 variant) UUID from the seeded RNG, formatted directly:
        # uuid.uuid4() would read os.urandom and break determinism.
        h = f"{(self.getrandbits(128) & ~(0xF000 << 64 | 0xC000 << 48)) | (0x4000 << 64 | 0x8000 << 48):032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def timestamp(self, source: str) -> str:
        self.clock_ms += self.randint(0, 10)
        second, millis = divmod(self.clock_ms, 1000)
        zone, suffix = self.choice(self.zones[source])
        # Formatting a datetime per event is a fifth of the generator's time; the clock moves
        # ~5 ms per event, so the "YYYY-MM-DDTHH:MM:SS" part is shared by ~200 events.
        if second != self.ts_second:
            self.ts_second, self.ts_prefixes = second, {}
        prefix = self.ts_prefixes.get(suffix)
        if prefix is None:
            prefix = datetime.fromtimestamp(second, zone).strftime("%Y-%m-%dT%H:%M:%S")
            self.ts_prefixes[suffix] = prefix
        return f"{prefix}.{millis:03d}{suffix}"

    def event(self, user_id: str, source: str | None = None, event_type: str | None = None) -> dict[str, Any]:
        source = source or self.pick(self.sources)
        event_type = event_type or self.pick(self.types[source])
        return {
            "event_id": self.event_id(),
            "event_type": event_type,
            "timestamp": self.timestamp(source if source in SOURCE_ZONES else "web"),
            "user_id": user_id,
            "properties": self.props(source, event_type),
            "source": source,
        }

    def event_json(self, user_id: str, source: str | None = None, event_type: str | None = None) -> bytes:
        """orjson.dumps(self.event(...)) by string formatting: the properties come serialized
        from the pool and the other five fields are plain identifiers, digits and dashes that
        need no escaping. Three times faster than building and dumping the dict, and most
        events take this path."""
        source = source or self.pick(self.sources)
        event_type = event_type or self.pick(self.types[source])
        event_id = self.event_id()
        timestamp = self.timestamp(source if source in SOURCE_ZONES else "web")
        properties = self.pooled(source, event_type)[1]
        return (
            f'{{"event_id":"{event_id}","event_type":"{event_type}","timestamp":"{timestamp}",'
            f'"user_id":"{user_id}","properties":{properties},"source":"{source}"}}'
        ).encode()

    def props(self, source: str, event_type: str) -> dict[str, Any]:
        return self.pooled(source, event_type)[0]

    def pooled(self, source: str, event_type: str) -> tuple[dict[str, Any], str]:
        """Properties for an event, as a dict and as JSON: built fresh for the first
        PROPERTY_POOL events of each (source, type), then drawn from those. Building nested
        properties costs most of an event; the pool keeps the variety (sessions, orders and
        products recur, as in real traffic) at a fraction of the cost."""
        pool = self.pools.get((source, event_type))
        if pool is None:
            pool = self.pools[(source, event_type)] = []
        if len(pool) < PROPERTY_POOL:
            built = self.properties[event_type](source)
            entry = (built, orjson.dumps(built).decode())
            pool.append(entry)
            return entry
        return pool[int(self.random() * PROPERTY_POOL)]

    # ---- properties, one builder per event type ------------------------------------------

    def _context(self, source: str) -> dict[str, Any]:
        """Where the event came from: browser session, app install or service."""
        if source == "mobile":
            model, os_name, os_version = self.choice(DEVICES)
            return {
                "app_version": f"4.{self.randint(0, 12)}.{self.randint(0, 9)}",
                "device": {"model": model, "os": os_name, "os_version": os_version},
                "locale": self.choice(LOCALES),
                "session_id": f"s-{self.getrandbits(48):012x}",
            }
        if source == "web":
            return {
                "session_id": f"s-{self.getrandbits(48):012x}",
                "user_agent": self.choice(USER_AGENTS),
                "locale": self.choice(LOCALES),
            }
        return {
            "service": self.choice(("billing", "accounts", "orders")),
            "request_id": f"req-{self.getrandbits(64):016x}",
        }

    def _product(self) -> dict[str, Any]:
        pid, name, category, price = self.choice(PRODUCTS)
        return {
            "id": pid,
            "name": name,
            "category": category,
            "price": price,
            "currency": self.choice(CURRENCIES),
        }

    def _url(self) -> str:
        pid, _, category, _ = self.choice(PRODUCTS)
        return "https://shop.example.com" + self.choice(PAGES).format(pid=pid, cat=category)

    def _page_view(self, source: str) -> dict[str, Any]:
        props: dict[str, Any] = {
            "url": self._url(),
            "referrer": self.choice(REFERRERS),
            "title": "Shop Example",
            "load_ms": self.randint(80, 2500),
            "viewport": {
                "width": self.choice((390, 1280, 1440, 1920)),
                "height": self.choice((844, 800, 900, 1080)),
            },
            "context": self._context(source),
        }
        utm = self.choice(UTM)
        if utm is not None:
            props["utm"] = utm
        return props

    def _click(self, source: str) -> dict[str, Any]:
        element_id, text = self.choice(BUTTONS)
        props: dict[str, Any] = {
            "element": {"id": element_id, "text": text, "tag": "button"},
            "position": {"x": self.randint(0, 1440), "y": self.randint(0, 3000)},
            "context": self._context(source),
        }
        if source == "web":
            props["url"] = self._url()
        else:
            props["screen"] = self.choice(SCREENS)
        return props

    def _search(self, source: str) -> dict[str, Any]:
        return {
            "query": self.choice(QUERIES),
            "results_count": self.randint(0, 240),
            "filters": {
                "category": self.choice(CATEGORIES),
                "price_max": self.choice((50, 100, 250, None)),
                "in_stock": self.random() < 0.7,
            },
            "page": self.randint(1, 4),
            "context": self._context(source),
        }

    def _signup(self, source: str) -> dict[str, Any]:
        # Signups and logins carry personal data (email, ip_address), as real ones do, so the
        # storage stage's redaction of sensitive properties has something to redact.
        return {
            "method": self.choice(("email", "google", "apple")),
            "email": f"customer{self.randint(1, 99_999)}@example.com",
            "plan": self.choice(PLANS)[0],
            "marketing_opt_in": self.random() < 0.4,
            "referral_code": self.choice((None, "FRIEND10", "BF2026")),
            "context": self._context(source),
        }

    def _login(self, source: str) -> dict[str, Any]:
        return {
            "method": self.choice(("password", "google", "apple", "magic_link")),
            "ip_address": f"203.0.113.{self.randint(1, 254)}",  # TEST-NET-3: never a real host
            "mfa": self.random() < 0.3,
            "remember_me": self.random() < 0.5,
            "context": self._context(source),
        }

    def _logout(self, source: str) -> dict[str, Any]:
        return {
            "reason": self.choice(("user", "timeout", "password_change")),
            "session_duration_s": self.randint(30, 7200),
            "context": self._context(source),
        }

    def _add_to_cart(self, source: str) -> dict[str, Any]:
        product = self._product()
        quantity = self.randint(1, 3)
        return {
            "product": product,
            "quantity": quantity,
            "cart": {"items": self.randint(quantity, 8), "value": round(product["price"] * quantity, 2)},
            "context": self._context(source),
        }

    def _purchase(self, source: str) -> dict[str, Any]:
        items = []
        total = 0.0
        for _ in range(self.randint(1, 3)):
            pid, _, _, price = self.choice(PRODUCTS)
            quantity = self.randint(1, 2)
            items.append({"product_id": pid, "quantity": quantity, "unit_price": price})
            total += price * quantity
        return {
            "order_id": f"o-{self.getrandbits(40):010x}",
            "items": items,
            "total": round(total, 2),
            "currency": self.choice(CURRENCIES),
            "payment": {
                "method": self.choice(("card", "paypal", "sepa")),
                "provider": self.choice(("stripe", "adyen")),
            },
            "shipping": {"country": self.choice(COUNTRIES), "method": self.choice(("standard", "express"))},
            "context": self._context(source),
        }

    def _refund(self, source: str) -> dict[str, Any]:
        return {
            "order_id": f"o-{self.getrandbits(40):010x}",
            "amount": round(self.uniform(5, 300), 2),
            "currency": self.choice(CURRENCIES),
            "reason": self.choice(("damaged", "wrong_size", "not_as_described", "late_delivery")),
            "context": self._context(source),
        }

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.random()

    def _subscription_started(self, source: str) -> dict[str, Any]:
        plan, price = self.choice(PLANS)
        return {
            "subscription_id": f"sub-{self.getrandbits(40):010x}",
            "plan": plan,
            "interval": self.choice(("month", "year")),
            "price": price,
            "currency": self.choice(CURRENCIES),
            "trial_days": self.choice((0, 0, 14, 30)),
            "context": self._context(source),
        }

    def _subscription_cancelled(self, source: str) -> dict[str, Any]:
        plan, _ = self.choice(PLANS)
        return {
            "subscription_id": f"sub-{self.getrandbits(40):010x}",
            "plan": plan,
            "reason": self.choice(("too_expensive", "missing_feature", "switched", None)),
            "at_period_end": self.random() < 0.8,
            "context": self._context(source),
        }

    def _payment_failed(self, source: str) -> dict[str, Any]:
        return {
            "payment_id": f"pay-{self.getrandbits(48):012x}",
            "amount": round(self.uniform(5, 400), 2),
            "currency": self.choice(CURRENCIES),
            "decline_code": self.choice(DECLINE_CODES),
            "attempt": self.randint(1, 4),
            "provider": {"name": self.choice(("stripe", "adyen")), "retryable": self.random() < 0.5},
            "context": self._context(source),
        }

    def _app_open(self, source: str) -> dict[str, Any]:
        return {
            "cold_start": self.random() < 0.4,
            "launch_ms": self.randint(150, 3000),
            "from_background_s": self.randint(0, 86400),
            "context": self._context(source),
        }

    def _screen_view(self, source: str) -> dict[str, Any]:
        return {
            "screen": self.choice(SCREENS),
            "previous_screen": self.choice(SCREENS),
            "duration_ms": self.randint(200, 120_000),
            "context": self._context(source),
        }

    def _push_open(self, source: str) -> dict[str, Any]:
        return {
            "campaign_id": self.choice(("black-friday", "winter-drop", "cart-reminder")),
            "message_id": f"m-{self.getrandbits(48):012x}",
            "delay_s": self.randint(1, 36000),
            "context": self._context(source),
        }

    def _heartbeat(self, source: str) -> dict[str, Any]:
        return {"interval_s": 30, "uptime_s": self.randint(30, 864_000), "context": self._context(source)}

    def _debug(self, source: str) -> dict[str, Any]:
        return {
            "level": self.choice(("debug", "trace")),
            "component": self.choice(("sdk", "consent", "cache")),
            "message": "state transition",
            "data": {"from": "idle", "to": "active"},
            "context": self._context(source),
        }

    # ---- the invalid kinds ----------------------------------------------------------------

    def parse_error(self, valid: bytes) -> bytes:
        """Bytes no JSON parser accepts: broken UTF-8, a truncated object, or plain text."""
        variant = self.randint(0, 3)
        if variant == 0:  # a Latin-1 byte inside a string: not UTF-8
            return valid.replace(b'"source"', b'"s\xf6urce"', 1)
        if variant == 1:  # cut off mid-object, as a crashed writer leaves it
            return valid[: self.randint(1, len(valid) - 2)]
        if variant == 2:  # a log line sent to the wrong place
            return b"event=page_view user=" + valid[-40:].replace(b'"', b"")
        return valid + b"}"  # trailing garbage after a complete object

    def schema_violation(self, event: dict[str, Any]) -> bytes:
        """JSON that parses but breaks one rule of the raw contract."""
        variant = self.randint(0, 7)
        if variant == 0:
            del event[self.choice(REQUIRED_FIELDS)]
        elif variant == 1:  # a naive timestamp: no offset, so the instant is unknown
            event["timestamp"] = event["timestamp"][:23]
        elif variant == 2:
            event["properties"] = self.choice((["a", "b"], "color=red", 42, None))
        elif variant == 3:
            event["campaign"] = "black-friday"  # unknown top-level field
        elif variant == 4:
            event[self.choice(("event_id", "event_type", "user_id", "source"))] = ""
        elif variant == 5:
            event["timestamp"] = self.choice(("yesterday", "2026-13-45T25:61:00+01:00", "1764162187"))
        elif variant == 6:
            event["user_id"] = self.randint(1, 950)  # a number, not a string
        else:  # the contract wants strings: an event id sent as a number breaks it
            event["event_id"] = self.randint(1, 10**9)
        return orjson.dumps(event)

    def policy_denied(self, user_id: str) -> dict[str, Any]:
        """A well-formed event the message-level policy refuses."""
        if self.random() < 0.5:  # a source nobody registered
            event_type = self.choice(("page_view", "click", "app_open", "purchase"))
            return self.event(
                user_id, source=self.choice(("tv", "kiosk", "smartwatch")), event_type=event_type
            )
        source = self.choice(self.source_names)
        forbidden = sorted(ALL_EVENT_TYPES - set(SOURCE_EVENT_TYPES[source]))
        return self.event(user_id, source=source, event_type=self.choice(forbidden))


def generate_events(
    n: int,
    *,
    invalid_fraction: float = 0.05,
    duplicate_fraction: float = 0.02,
    test_user_fraction: float = 0.05,
    unknown_user_fraction: float = 0.01,
    heartbeat_fraction: float = DEFAULT_HEARTBEAT_FRACTION,
    seed: int | None = None,
    start: datetime | None = None,
    source: str | None = None,
) -> Iterator[GeneratedEvent]:
    """Yield `n` raw records (key = user_id bytes, value = JSON bytes), each labelled with its kind
    and the source whose raw topic it belongs on; `source`: only that source's events.

    Each record independently becomes invalid, a duplicate, a test user's, an unknown user's
    or a heartbeat with the given probabilities, else a valid event. The output is a pure
    function of (seed, start); timestamps are in order and end by `start` (default now), so
    they look like recent traffic.
    """
    fractions = {
        "invalid_fraction": invalid_fraction,
        "duplicate_fraction": duplicate_fraction,
        "test_user_fraction": test_user_fraction,
        "unknown_user_fraction": unknown_user_fraction,
        "heartbeat_fraction": heartbeat_fraction,
    }
    for name, value in fractions.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be within [0, 1], got {value}")
    if sum(fractions.values()) > 1.0 + 1e-9:
        raise ValueError(f"the fractions add up to more than 1: {sum(fractions.values()):.3f}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if source is not None and source not in SOURCE_EVENT_TYPES:
        raise ValueError(f"the generator knows the sources {', '.join(SOURCE_EVENT_TYPES)}, not {source!r}")

    # Checked here, eagerly; the records come from an inner generator so a bad argument
    # fails at the call, not at the first next().
    return _generate(
        n,
        invalid_fraction,
        duplicate_fraction,
        test_user_fraction,
        unknown_user_fraction,
        heartbeat_fraction,
        seed,
        start or datetime.now(UTC),
        source,
    )


def _generate(
    n: int,
    invalid_fraction: float,
    duplicate_fraction: float,
    test_user_fraction: float,
    unknown_user_fraction: float,
    heartbeat_fraction: float,
    seed: int | None,
    start: datetime,
    only_source: str | None,
) -> Iterator[GeneratedEvent]:
    rng = random.Random(seed)
    b = _Builder(rng, start, n, only_source)
    # Where a claim of an unregistered source is sent from: a registered source's topic.
    fallback = only_source or "web"
    # Cumulative thresholds on one uniform draw per record: cheaper than nested draws and
    # makes each kind's share exactly its fraction.
    t_invalid = invalid_fraction
    t_duplicate = t_invalid + duplicate_fraction
    t_test = t_duplicate + test_user_fraction
    t_unknown = t_test + unknown_user_fraction
    t_heartbeat = t_unknown + heartbeat_fraction
    invalid_kinds = _cumulative(INVALID_SPLIT)
    recent_valid: list[GeneratedEvent] = []
    draw, randint, dumps, pick, sources = rng.random, b.randint, orjson.dumps, b.pick, b.sources
    regular_users = FIRST_TEST_USER - 1
    user_ids = [sample_user_id(i) for i in range(SAMPLE_USER_COUNT + 1)]  # index = user number

    for _ in range(n):
        r = draw()
        if r < t_invalid:
            kind = b.pick(invalid_kinds)
            user_id = user_ids[randint(1, regular_users)]
            # The source is drawn first, as event()/event_json() would: same seed, same events.
            if kind == "invalid:parse_error":
                source = pick(sources)
                value = b.parse_error(dumps(b.event(user_id, source)))
            elif kind == "invalid:schema_violation":
                source = pick(sources)
                value = b.schema_violation(b.event(user_id, source))
            else:
                event = b.policy_denied(user_id)
                source = event["source"] if event["source"] in SOURCE_EVENT_TYPES else fallback
                value = dumps(event)
            yield GeneratedEvent(user_id.encode(), value, kind, source)
        elif r < t_duplicate and recent_valid:
            original = recent_valid[randint(0, len(recent_valid) - 1)]
            yield GeneratedEvent(original.key, original.value, "duplicate", original.source)
        elif t_duplicate <= r < t_test:
            user_id = user_ids[randint(FIRST_TEST_USER, SAMPLE_USER_COUNT)]
            source = pick(sources)
            yield GeneratedEvent(user_id.encode(), b.event_json(user_id, source), "test_user", source)
        elif t_test <= r < t_unknown:
            # Ids past the seeded range: well-formed, but no row in the users table.
            user_id = sample_user_id(randint(SAMPLE_USER_COUNT + 1, 99_999))
            source = pick(sources)
            yield GeneratedEvent(user_id.encode(), b.event_json(user_id, source), "unknown_user", source)
        elif t_unknown <= r < t_heartbeat:
            user_id = user_ids[randint(1, regular_users)]
            source = pick(sources)
            value = b.event_json(user_id, source=source, event_type=b.choice(NOISE_TYPES))
            yield GeneratedEvent(user_id.encode(), value, "heartbeat", source)
        else:  # valid; also a duplicate drawn before any valid event existed to repeat
            user_id = user_ids[randint(1, regular_users)]
            source = pick(sources)
            generated = GeneratedEvent(user_id.encode(), b.event_json(user_id, source), "valid", source)
            if len(recent_valid) < DUPLICATE_WINDOW:
                recent_valid.append(generated)
            else:
                recent_valid[randint(0, DUPLICATE_WINDOW - 1)] = generated
            yield generated
