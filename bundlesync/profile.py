"""Sync profiles: which app tables sync, how a row maps to its partition, which scopes exist.

A profile is YAML (``fixtures/facility_profile.yaml`` and the built-in ``bundlesync/profiles/*.yaml`` are
examples): ``name`` ([A-Za-z0-9_.-]+), ``version`` (integer >= 1); ``facility``: ``table``, ``id_column``
(default ``id``), ``dataset_column`` (default ``dataset_id``), ``where`` (optional SQL condition); ``scopes``:
``full`` (required, variable ``${dataset_id}``) and ``user`` (optional, also ``${user_id}``), each with optional
``read``, ``write``, ``read_write`` lists of partition prefix templates; ``plugins`` (optional): import paths of
plugins that devices using this profile load (like ``plugins:`` in a home's config.yaml); ``tables``: a list, in
any order, of ``name``, ``primary_key``, ``partition`` (a template or a list of alternatives: the first whose
variables are all non-NULL applies) and optionally ``dataset_column`` (default ``dataset_id``),
``self_reference``, ``foreign_keys`` (column -> profile table), ``exclude``, ``lookups`` and ``receive``. Lists
may also be given as one string.

``lookups`` name template variables that are not columns of the row but computed from it in SQL, each either
``{sql: EXPR}`` (an SQL expression; ``${column}`` stands for a column of the row) or
``{lookup: FK_COLUMN, column: C, up: SELF_REF, until: CONDITION}``: follow the declared foreign key
``FK_COLUMN`` to its parent row and take its column ``C`` (default: the parent's primary key); with ``up`` (the
parent table's ``self_reference``) and ``until`` (an SQL condition on a parent row), climb the parent's own
hierarchy from there until a row meets ``until``. Partitions that use a lookup are computed in SQL by the
sender; an importer checks the claimed partition's literal parts and columns at once, and recomputes the whole
partition in its own database before it writes the row (the parent is in place by then, since rows wait for
their parents): a row whose claim differs is not written and waits, with the reason, like a row whose parent
has not arrived.

``receive`` maps columns that do not travel to what they get on the receiving side whenever a row is written
there: a YAML scalar (a constant) or ``{sql: EXPR}``, an SQL expression over the incoming row (``${column}``
for its synced columns, ``${partition}`` for the partition the profile computes), e.g. ``_morango_dirty_bit: 0``
and ``_morango_partition: {sql: "${partition}"}``. Excluded NOT NULL columns without a default must be received.

Templates use ``${name}`` placeholders only. Every partition and scope template must start with the dataset
(``${dataset_column}`` / ``${dataset_id}``) so a facility's scopes can cover it; duplicate YAML keys,
``sqlite_*``/``bundlesync_*`` tables and excluded or received columns that the profile relies on are refused.
:func:`bind_profile` refuses REAL partition columns: partitions are built with ``str()`` in Python and
``||`` in SQL, which agree for TEXT and INTEGER values only. It also refuses an ``INTEGER PRIMARY KEY`` (a rowid
alias) as a table's primary_key: its values are allocated per device, so they are not globally unique.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.resources
import json
import re
import sqlite3
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from bundlesync.errors import ProfileError
from bundlesync.fsutil import read_regular

__all__ = ["FacilityLookup", "Lookup", "Profile", "Received", "ScopeTemplate", "TableSpec", "bind_profile",
           "builtin_profiles", "is_builtin_name", "load_profile", "parse_profile", "resolve_profile"]

_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_SCOPE_VARIABLES = {"full": ("dataset_id",), "user": ("dataset_id", "user_id")}
_TOP_KEYS = ("name", "version", "facility", "scopes", "tables", "plugins")
_REQUIRED_TOP = ("name", "version", "facility", "scopes", "tables")
_FACILITY_KEYS = ("table", "id_column", "dataset_column", "where")
_SCOPE_KEYS = ("read", "write", "read_write")
_TABLE_KEYS = ("name", "primary_key", "partition", "dataset_column", "self_reference", "foreign_keys", "exclude",
               "lookups", "receive")
_LOOKUP_KEYS = ("sql", "lookup", "column", "up", "until")
NEW = "bundlesync_new"
"""Alias of the incoming row in the statements that write it (receive values, lookup checks)."""
PARTITION_COLUMN = "bundlesync_partition"
"""The incoming row's partition, next to its columns, in those statements."""
MAX_PROFILE_BYTES = 4 << 20
"""A profile file larger than this is refused unread (a real one is a few KiB)."""

_Split = tuple[tuple[str, ...], tuple[str, ...]]


def _q(name: str) -> str:
    """Quote an SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def _split_template(template: str) -> _Split:
    """Split into literals and variables (one more literal); ValueError for a stray ``$`` or a NUL."""
    if "\x00" in template:
        raise ValueError("contains a NUL character; remove it")
    pieces = _PLACEHOLDER.split(template)  # literal, name, literal, ..., literal
    literals, names = pieces[0::2], pieces[1::2]
    if any("$" in lit for lit in literals):
        raise ValueError("has a '$' outside a ${name} placeholder; write variables as ${column}")
    return tuple(literals), tuple(names)


def _sql_names(sql: str) -> tuple[str, ...]:
    """The ``${name}`` placeholders of an SQL text, in order of first use."""
    return tuple(dict.fromkeys(_PLACEHOLDER.findall(sql)))


def _fill_sql(sql: str, alias: str | None, extra: Mapping[str, str] | None = None) -> str:
    """Replace ``${column}`` by the column (qualified by ``alias``) and other names by ``extra``'s SQL."""
    prefix = _q(alias) + "." if alias else ""

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        return extra[name] if extra and name in extra else prefix + _q(name)

    return _PLACEHOLDER.sub(one, sql)


def _literal(value: object) -> str:
    """A YAML scalar as an SQL literal."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


@dataclass(frozen=True)
class Lookup:
    """A template variable computed in SQL from the row: ``sql`` with ``${column}`` placeholders."""

    name: str
    sql: str
    columns: tuple[str, ...]  # the row's columns it reads

    def expression(self, alias: str | None) -> str:
        """The lookup as a parenthesised SQL expression over the row aliased ``alias``."""
        return "(" + _fill_sql(self.sql, alias) + ")"


@dataclass(frozen=True)
class Received:
    """What a column that does not travel gets on the receiving side: SQL over the incoming row."""

    column: str
    sql: str  # ``${column}`` and ``${partition}`` placeholders; a constant is a literal
    columns: tuple[str, ...]  # the row's columns it reads

    def expression(self, alias: str) -> str:
        """The value as SQL over the incoming row ``alias`` (its columns and its partition column)."""
        return _fill_sql(self.sql, alias, {"partition": f"{_q(alias)}.{_q(PARTITION_COLUMN)}"})


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class TableSpec:
    """One syncable table of a profile (see the module docstring for the meaning of each key)."""

    name: str
    primary_key: str  # one globally unique column (a UUID): the record's identity
    partitions: tuple[str, ...]  # templates, alternatives in order of preference
    dataset_column: str
    foreign_keys: Mapping[str, str]  # column -> syncable parent table
    self_reference: str | None  # column referencing this same table
    exclude: frozenset[str]  # columns not synced
    columns: tuple[str, ...] = ()  # synced columns in table order, filled by bind_profile
    lookups: Mapping[str, Lookup] = field(default_factory=_empty)  # template variables computed in SQL
    receive: Mapping[str, Received] = field(default_factory=_empty)  # columns set on the receiving side
    _split: tuple[_Split, ...] = field(init=False, repr=False, compare=False)
    # Per alternative (variables, %-format): partition_of runs once per synced row.
    _formats: tuple[tuple[tuple[str, ...], str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.partitions:
            raise ProfileError(f"table {self.name!r} has no partition template; add one")
        split = []
        for template in self.partitions:
            try:
                split.append(_split_template(template))
            except ValueError as exc:
                raise ProfileError(f"table {self.name!r}: partition template {template!r} {exc}") from None
        object.__setattr__(self, "_split", tuple(split))
        object.__setattr__(self, "_formats", tuple(
            (names, "%s".join(lit.replace("%", "%%") for lit in literals)) for literals, names in split))

    def __hash__(self) -> int:  # the generated hash would fail on the foreign_keys mapping
        return hash((self.name, self.primary_key, self.partitions, self.columns))

    def template_variables(self) -> tuple[str, ...]:
        """Every variable the partition templates use (columns and lookups), in order of first use."""
        return tuple(dict.fromkeys(n for _, names in self._split for n in names))

    def template_columns(self) -> tuple[str, ...]:
        """Every column the partition needs: template columns and the columns lookups read, in order of first use."""
        out: dict[str, None] = {}
        for name in self.template_variables():
            out.update(dict.fromkeys(self.lookups[name].columns) if name in self.lookups else {name: None})
        return tuple(out)

    def partition_of(self, row: Mapping[str, object]) -> str:
        """The partition of ``row`` (a dict or ``sqlite3.Row``): the first alternative whose columns are non-None.

        Raises:
            ProfileError: Every alternative uses a column that is None in ``row``, or the partition needs a
                lookup (use :meth:`partition_sql` or :meth:`partition_matches`).
        """
        if self.lookups:
            raise ProfileError(f"table {self.name!r}: its partition needs a lookup in the database; "
                               "compute it with partition_sql")
        for names, fmt in self._formats:
            values = tuple([row[n] for n in names])
            if None not in values:
                return fmt % values
        nulls = sorted({n for n in self.template_columns() if row[n] is None})
        raise ProfileError(
            f"table {self.name!r}: a row has NULL in {', '.join(nulls)}, so no partition template of "
            f"{list(self.partitions)} applies; fix the row or add a template without those columns to the profile")

    def partition_matches(self, row: Mapping[str, object], claimed: str) -> bool:
        """Whether ``claimed`` is the partition of ``row`` as far as the row alone can tell.

        Without lookups this is ``partition_of(row) == claimed``. An alternative with lookups matches when its
        literal parts and columns agree and each lookup stands for a non-empty part; the importer recomputes
        such a partition in the database before it writes the row (:meth:`partition_sql`).
        """
        if not self.lookups:  # the common case, once per imported record: no regular expressions
            for names, fmt in self._formats:
                values = tuple([row[n] for n in names])
                if None not in values:
                    return fmt % values == claimed
            return False
        for (literals, names), (_, fmt) in zip(self._split, self._formats):
            if None in [row[n] for n in names if n not in self.lookups]:
                continue
            if not any(n in self.lookups for n in names):
                return fmt % tuple([row[n] for n in names]) == claimed
            regex = re.escape(literals[0]) + "".join(
                ("(.+)" if n in self.lookups else re.escape(str(row[n]))) + re.escape(literal)
                for n, literal in zip(names, literals[1:]))
            return re.fullmatch(regex, claimed, re.DOTALL) is not None
        return False

    def row_for_partition(self, partition: str) -> dict[str, object] | None:
        """Values of the partition's columns that give ``partition`` (the others None), or None if none can.

        For a deletion whose row is gone and whose data is unknown: a row with just these values still
        proves its partition to a receiver. Alternatives that need a lookup are not inverted.
        """
        variables = self.template_variables()
        for literals, names in self._split:
            if any(n in self.lookups for n in names) or any(n in self.lookups for n in variables):
                continue
            regex = re.escape(literals[0]) + "".join("(.*?)" + re.escape(literal) for literal in literals[1:])
            found = re.fullmatch(regex, partition, re.DOTALL)
            if found is None:
                continue
            row: dict[str, object] = dict.fromkeys(variables)
            for name, value in zip(names, found.groups()):
                if row[name] not in (None, value):
                    break
                row[name] = value
            else:
                if self.partition_matches(row, partition):
                    return row
        return None

    def partition_sql(self, alias: str | None = None) -> str:
        """An SQL expression equal to :meth:`partition_of` (NULL where it raises), columns qualified by ``alias``.

        Lookups are evaluated as subqueries, so it also covers tables whose partition needs one (NULL if the
        lookup finds nothing).
        """
        prefix = _q(alias) + "." if alias else ""

        def variable(name: str) -> str:
            return self.lookups[name].expression(alias) if name in self.lookups else prefix + _q(name)

        whens: list[str] = []
        for literals, names in self._split:
            parts = []
            for i, literal in enumerate(literals):
                if literal:
                    parts.append("'" + literal.replace("'", "''") + "'")
                if i < len(names):
                    parts.append(variable(names[i]))
            # A lone column keeps its storage type; Python's str() always gives text.
            expr = " || ".join(parts) if len(parts) > 1 else f"CAST({parts[0]} AS TEXT)" if parts else "''"
            if not names or len(self._split) == 1:
                # A constant always applies; a lone template is NULL when one of its columns is.
                return f"CASE {' '.join(whens)} ELSE {expr} END" if whens else expr
            test = " AND ".join(f"{variable(n)} IS NOT NULL" for n in dict.fromkeys(names))
            whens.append(f"WHEN {test} THEN {expr}")
        return f"CASE {' '.join(whens)} END"


@dataclass(frozen=True)
class ScopeTemplate:
    """The partition prefix templates of one certificate scope (Morango's ScopeDefinition)."""

    read: tuple[str, ...]
    write: tuple[str, ...]
    read_write: tuple[str, ...]

    def read_prefixes(self, **params: str) -> tuple[str, ...]:
        """Prefixes the holder may read: ``read_write`` + ``read``, substituted."""
        return _substitute(self.read_write + self.read, params)

    def write_prefixes(self, **params: str) -> tuple[str, ...]:
        """Prefixes the holder may write: ``read_write`` + ``write``, substituted."""
        return _substitute(self.read_write + self.write, params)


def _substitute(templates: Iterable[str], params: Mapping[str, str]) -> tuple[str, ...]:
    out: dict[str, None] = {}
    for template in templates:
        try:
            out[string.Template(template).substitute(params)] = None
        except KeyError as exc:
            raise ProfileError(f"scope template {template!r} needs the parameter {exc.args[0]!r}; "
                               "pass it (a user scope needs a user id)") from None
    return tuple(out)


@dataclass(frozen=True)
class FacilityLookup:
    """Where ``--facility ID`` is found: ``dataset_column`` of the ``table`` row with that id."""

    table: str
    id_column: str
    dataset_column: str
    where: str | None


@dataclass(frozen=True)
class Profile:
    """A validated profile; :func:`bind_profile` fills in the tables' columns."""

    name: str
    version: int
    source: Path | None
    tables: tuple[TableSpec, ...]
    facility: FacilityLookup
    scopes: Mapping[str, ScopeTemplate]
    digest: str
    plugins: tuple[str, ...] = ()  # import paths of plugins devices using this profile load
    _by_name: Mapping[str, TableSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {t.name: t for t in self.tables})

    def table(self, name: str) -> TableSpec:
        """The spec of table ``name``; ProfileError if the profile does not sync it."""
        try:
            return self._by_name[name]
        except KeyError:
            raise ProfileError(f"table {name!r} is not in profile {self.name!r} version {self.version}; "
                               "use a profile that lists it") from None

    def has_table(self, name: str) -> bool:
        """Whether the profile syncs table ``name``."""
        return name in self._by_name


_SafeLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser: a profile loads in a tenth of the time


class _UniqueKeyLoader(_SafeLoader):  # type: ignore[misc]
    """SafeLoader that refuses duplicate keys, which PyYAML would silently overwrite."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def builtin_profiles() -> dict[str, Path]:
    """The profiles shipped with bundlesync (``bundlesync/profiles/NAME.yaml``), by name."""
    folder = importlib.resources.files("bundlesync.profiles")
    found = {}
    for entry in folder.iterdir():
        if entry.name.endswith(".yaml") and entry.is_file():
            found[entry.name[: -len(".yaml")]] = Path(str(entry))
    return dict(sorted(found.items()))


def is_builtin_name(spec: str | Path) -> bool:
    """Whether ``spec`` names a built-in profile (a bare name; anything with a path separator is a path)."""
    text = str(spec)
    return "/" not in text and "\\" not in text and text in builtin_profiles()


def resolve_profile(spec: str | Path) -> Path:
    """The file of ``spec``: a built-in profile's name (``kolibri``), else a path to a YAML file."""
    return builtin_profiles()[str(spec)] if is_builtin_name(spec) else Path(spec)


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile: a built-in profile's name or a YAML file (not yet checked against a database).

    Raises:
        ProfileError: The file is missing, unreadable, not YAML or not a valid profile.
    """
    source = resolve_profile(path)
    try:
        text = read_regular(source, MAX_PROFILE_BYTES)  # YAML decodes UTF-8/16 itself and reports bad bytes as a YAMLError
    except FileNotFoundError:
        names = ", ".join(builtin_profiles()) or "none"
        raise ProfileError(f"profile {source} does not exist; check the path, or name a built-in profile "
                           f"({names}; see `bundlesync profiles`)") from None
    except OSError as exc:
        raise ProfileError(f"cannot read profile {source}: {exc.strerror or exc}; pass a readable file") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ProfileError(f"profile {source} is not valid YAML{where}: {problem}; fix the syntax") from None
    return parse_profile(data, source)


class _Parser:
    """Typed access to the loaded YAML; every failure names the file and the place."""

    def __init__(self, source: Path | None) -> None:
        self.label = f"profile {source}" if source else "profile"

    def fail(self, where: str, message: str) -> ProfileError:
        return ProfileError(f"{self.label}: {where}{message}")

    def mapping(self, value: object, where: str, allowed: tuple[str, ...],
                required: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"must be a mapping with keys {', '.join(allowed)}, "
                                   f"not {type(value).__name__}; fix its layout")
        for key in value:
            if key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, 1)
                fix = f"did you mean {hint[0]!r}?" if hint else f"allowed: {', '.join(allowed)}"
                raise self.fail(where, f"unknown key {key!r}; {fix}")
        for key in required:
            if key not in value:
                raise self.fail(where, f"missing key {key!r}; add it")
        return value

    def text(self, value: object, where: str, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(where, f"{key!r} must be a non-empty string, got {value!r}; fix it")
        return value

    def texts(self, value: object, where: str, key: str) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) and v for v in items):
            raise self.fail(where, f"{key!r} must be a string or a list of non-empty strings, got {value!r}; fix it")
        return tuple(items)

    def template(self, template: str, where: str, first: str, allowed: tuple[str, ...] | None) -> tuple[str, ...]:
        try:
            literals, names = _split_template(template)
        except ValueError as exc:
            raise self.fail(where, f"template {template!r} {exc}") from None
        for name in names:
            if allowed is not None and name not in allowed:
                raise self.fail(where, f"template {template!r} uses unknown variable ${{{name}}}; "
                                       f"only {', '.join(allowed)} exist here")
        if literals[0] or not names or names[0] != first:
            raise self.fail(where, f"template {template!r} must start with ${{{first}}} so that the "
                                   "dataset's scopes cover it; put it first")
        return names


def parse_profile(data: object, source: Path | None = None) -> Profile:
    """Validate loaded YAML data and build a :class:`Profile`.

    Args:
        data: The YAML document as Python objects.
        source: The file it came from, for messages and :attr:`Profile.source`.

    Raises:
        ProfileError: A key is missing, unknown or mistyped, a template is malformed, a table is listed
            twice, a foreign key leaves the profile or the foreign keys form a cycle.
    """
    p = _Parser(source)
    top = p.mapping(data, "", _TOP_KEYS, _REQUIRED_TOP)
    name = p.text(top["name"], "", "name")
    if not _NAME.fullmatch(name):
        raise p.fail("", f"name {name!r} may only use letters, digits, '.', '-' and '_'; rename it")
    version = top["version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise p.fail("", f"version must be an integer >= 1, got {version!r}; fix it")

    fac = p.mapping(top["facility"], "facility: ", _FACILITY_KEYS, ("table",))
    where = fac.get("where")
    if where is not None and (not isinstance(where, str) or not where.strip()):
        raise p.fail("facility: ", f"'where' must be an SQL condition, got {where!r}; fix it")
    facility = FacilityLookup(
        table=p.text(fac["table"], "facility: ", "table"),
        id_column=p.text(fac.get("id_column", "id"), "facility: ", "id_column"),
        dataset_column=p.text(fac.get("dataset_column", "dataset_id"), "facility: ", "dataset_column"), where=where)

    scopes: dict[str, ScopeTemplate] = {}
    for scope, raw in p.mapping(top["scopes"], "scopes: ", tuple(_SCOPE_VARIABLES), ("full",)).items():
        at = f"scope {scope!r}: "
        body = p.mapping(raw, at, _SCOPE_KEYS, ())
        lists = {key: p.texts(body.get(key, []), at, key) for key in _SCOPE_KEYS}
        for template in (t for templates in lists.values() for t in templates):
            p.template(template, at, "dataset_id", _SCOPE_VARIABLES[scope])
        scopes[scope] = ScopeTemplate(lists["read"], lists["write"], lists["read_write"])

    if not isinstance(top["tables"], list) or not top["tables"]:
        raise p.fail("", "'tables' must be a non-empty list; list the synced tables")
    specs: dict[str, TableSpec] = {}
    raw_lookups: dict[str, Mapping[str, Any]] = {}
    for index, raw in enumerate(top["tables"]):
        spec, lookups = _parse_table(p, raw, index)
        if spec.name in specs:
            raise p.fail("", f"table {spec.name!r} is listed twice; merge the entries")
        specs[spec.name], raw_lookups[spec.name] = spec, lookups
    for spec in specs.values():
        for column, parent in spec.foreign_keys.items():
            why = ("points at the table itself; declare it as 'self_reference' instead" if parent == spec.name
                   else None if parent in specs
                   else f"references {parent!r}, which is not in the profile; add that table or drop the key")
            if why:
                raise p.fail(f"table {spec.name!r}: ", f"foreign key {column!r} {why}")
    for table, lookups in raw_lookups.items():
        resolved = {n: _parse_lookup(p, specs[table], n, body, specs) for n, body in lookups.items()}
        specs[table] = dataclasses.replace(specs[table], lookups=MappingProxyType(resolved))
        _check_roles(p, specs[table])
    plugins = p.texts(top.get("plugins") or [], "", "plugins")

    # The digest covers the meaning, not the YAML's spelling (comments, quoting, defaults).
    canonical = {
        "name": name, "version": version, "facility": dataclasses.asdict(facility),
        "scopes": {k: dataclasses.asdict(v) for k, v in scopes.items()},
        "tables": [{"name": s.name, "primary_key": s.primary_key, "partitions": s.partitions,
                    "dataset_column": s.dataset_column, "foreign_keys": dict(s.foreign_keys),
                    "self_reference": s.self_reference, "exclude": sorted(s.exclude),
                    **({"lookups": {k: v.sql for k, v in s.lookups.items()}} if s.lookups else {}),
                    **({"receive": {k: v.sql for k, v in s.receive.items()}} if s.receive else {})}
                   for s in specs.values()],
        **({"plugins": list(plugins)} if plugins else {})}
    text = json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return Profile(name=name, version=version, source=source, tables=_order(p, specs), facility=facility,
                   scopes=MappingProxyType(scopes), digest=hashlib.sha256(text.encode("utf-8")).hexdigest(),
                   plugins=plugins)


def _parse_table(p: _Parser, raw: object, index: int) -> tuple[TableSpec, Mapping[str, Any]]:
    """One table entry, and its raw ``lookups`` (resolved once every table is known)."""
    at = f"tables[{index}]: "
    body = p.mapping(raw, at, _TABLE_KEYS, ("name", "primary_key", "partition"))
    name = p.text(body["name"], at, "name")
    at = f"table {name!r}: "
    if name.lower().startswith(("sqlite_", "bundlesync_")):
        raise p.fail(at, "SQLite's and bundlesync's own tables cannot be synced; remove it")
    primary_key = p.text(body["primary_key"], at, "primary_key")
    dataset_column = p.text(body.get("dataset_column", "dataset_id"), at, "dataset_column")
    self_ref = body.get("self_reference")
    self_ref = None if self_ref is None else p.text(self_ref, at, "self_reference")
    partitions = p.texts(body["partition"], at, "partition")
    for template in partitions:
        p.template(template, at, dataset_column, None)
    fks = body.get("foreign_keys") or {}
    if not isinstance(fks, dict) or not all(isinstance(k, str) and k and isinstance(v, str) and v
                                            for k, v in fks.items()):
        raise p.fail(at, f"'foreign_keys' must map columns to table names, got {fks!r}; fix it")
    if self_ref is not None and self_ref in fks:
        raise p.fail(at, f"column {self_ref!r} is both 'self_reference' and a foreign key; "
                         "keep it in 'self_reference' only")
    exclude = frozenset(p.texts(body.get("exclude") or [], at, "exclude"))
    lookups = body.get("lookups") or {}
    if not isinstance(lookups, dict) or not all(isinstance(k, str) and k for k in lookups):
        raise p.fail(at, f"'lookups' must map variable names to a lookup, got {lookups!r}; fix it")
    receive = body.get("receive") or {}
    if not isinstance(receive, dict) or not all(isinstance(k, str) and k for k in receive):
        raise p.fail(at, f"'receive' must map columns to a value or {{sql: EXPR}}, got {receive!r}; fix it")
    received = {column: _parse_received(p, at, column, value) for column, value in receive.items()}
    spec = TableSpec(name=name, primary_key=primary_key, partitions=partitions, dataset_column=dataset_column,
                     foreign_keys=MappingProxyType(dict(fks)), self_reference=self_ref, exclude=exclude,
                     receive=MappingProxyType(received))
    for variable in spec.template_variables():
        if variable == "partition":
            raise p.fail(at, "a partition template cannot use ${partition}; name the column or lookup")
    return spec, lookups


def _sql_text(p: _Parser, at: str, key: str, value: object) -> str:
    text = p.text(value, at, key)
    if "\x00" in text or ";" in text:
        raise p.fail(at, f"{key!r} must be one SQL expression without ';', got {text!r}; fix it")
    return text


def _parse_received(p: _Parser, at: str, column: str, value: object) -> Received:
    where = f"{at}receive {column!r}: "
    if isinstance(value, dict):
        body = p.mapping(value, where, ("sql",), ("sql",))
        sql = _sql_text(p, where, "sql", body["sql"])
        columns = tuple(n for n in _sql_names(sql) if n != "partition")
        return Received(column, sql, columns)
    if value is None or isinstance(value, (str, int, float, bool)):
        return Received(column, _literal(value), ())
    raise p.fail(where, f"must be a constant or {{sql: EXPR}}, got {value!r}; fix it")


def _parse_lookup(p: _Parser, spec: TableSpec, name: str, raw: object, specs: Mapping[str, TableSpec]) -> Lookup:
    """A ``lookups`` entry as SQL with ``${column}`` placeholders."""
    at = f"table {spec.name!r}: lookup {name!r}: "
    if name not in spec.template_variables():
        raise p.fail(at, "no partition template uses it; use it as ${" + name + "} or remove it")
    body = p.mapping(raw, at, _LOOKUP_KEYS, ())
    if ("sql" in body) == ("lookup" in body):
        raise p.fail(at, "give either 'sql' (an SQL expression) or 'lookup' (a foreign key column); fix it")
    if "sql" in body:
        extra = sorted(set(body) - {"sql"})
        if extra:
            raise p.fail(at, f"{extra[0]!r} goes with 'lookup', not with 'sql'; remove it")
        sql = _sql_text(p, at, "sql", body["sql"])
        return Lookup(name, sql, _sql_names(sql))
    fk = p.text(body["lookup"], at, "lookup")
    if fk not in spec.foreign_keys:
        raise p.fail(at, f"'lookup' {fk!r} is not a declared foreign key of the table; "
                         f"declare it under 'foreign_keys' (declared: {', '.join(spec.foreign_keys) or 'none'})")
    parent = specs[spec.foreign_keys[fk]]
    column = p.text(body.get("column", parent.primary_key), at, "column")
    up = body.get("up")
    until = body.get("until")
    if up is not None:
        up = p.text(up, at, "up")
        if up != parent.self_reference:
            raise p.fail(at, f"'up' {up!r} must be the self_reference of {parent.name!r} "
                             f"({parent.self_reference!r}); fix it")
        if until is None:
            raise p.fail(at, "'up' needs 'until', the SQL condition that stops the climb; add it")
    cond = None if until is None else _sql_text(p, at, "until", until)
    if cond is not None and _sql_names(cond):
        raise p.fail(at, "'until' is a condition on the parent row's columns, written plainly, not as ${...}; fix it")
    parent_t, pk, col = _q(parent.name), _q(parent.primary_key), _q(column)
    if up is None:
        test = f" AND ({cond})" if cond else ""
        sql = f"SELECT bundlesync_p.{col} FROM {parent_t} AS bundlesync_p WHERE bundlesync_p.{pk} = ${{{fk}}}{test}"
    else:
        # Climb the parent's hierarchy (bounded, so a cycle in the data cannot loop) until a row meets `until`.
        sql = (f"WITH RECURSIVE bundlesync_up (bundlesync_key, bundlesync_depth) AS (SELECT ${{{fk}}}, 0 UNION ALL "
               f"SELECT bundlesync_p.{_q(up)}, bundlesync_up.bundlesync_depth + 1 FROM bundlesync_up "
               f"JOIN {parent_t} AS bundlesync_p ON bundlesync_p.{pk} = bundlesync_up.bundlesync_key "
               f"WHERE NOT ({cond}) AND bundlesync_up.bundlesync_depth < 64) "
               f"SELECT bundlesync_p.{col} FROM bundlesync_up JOIN {parent_t} AS bundlesync_p "
               f"ON bundlesync_p.{pk} = bundlesync_up.bundlesync_key WHERE ({cond}) LIMIT 1")
    return Lookup(name, sql, (fk,))


def _check_roles(p: _Parser, spec: TableSpec) -> None:
    """Columns the profile relies on must travel: not excluded, not received."""
    at = f"table {spec.name!r}: "
    roles = {**{c: "a foreign key" for c in spec.foreign_keys},
             **{c: "used by the partition template" for c in spec.template_columns()},
             **({spec.self_reference: "the self-reference"} if spec.self_reference else {}),
             spec.dataset_column: "the dataset column", spec.primary_key: "the primary key"}
    for column in sorted(spec.exclude & roles.keys()):
        raise p.fail(at, f"excluded column {column!r} is {roles[column]} and must be synced; "
                         "remove it from 'exclude'")
    for column in sorted(spec.receive.keys() & roles.keys()):
        raise p.fail(at, f"received column {column!r} is {roles[column]} and must travel; "
                         "remove it from 'receive'")
    for column in sorted(spec.receive.keys() & spec.exclude):
        raise p.fail(at, f"column {column!r} is under both 'exclude' and 'receive'; a received column never "
                         "travels, so keep it under 'receive' only")
    for column, received in spec.receive.items():
        for used in received.columns:
            if used in spec.receive or used in spec.exclude:
                raise p.fail(at, f"receive {column!r} uses ${{{used}}}, which does not travel; "
                                 "use only synced columns and ${partition}")


def _order(p: _Parser, specs: Mapping[str, TableSpec]) -> tuple[TableSpec, ...]:
    """Parents before children, otherwise in listed order; a cycle is an error."""
    placed: dict[str, None] = {}
    remaining = list(specs.values())
    while remaining:
        ready = next((s for s in remaining if all(v in placed for v in s.foreign_keys.values())), None)
        if ready is None:
            # Every remaining table waits for another remaining one: walk up until a table repeats.
            path = [remaining[0].name]
            while (parent := next(v for v in specs[path[-1]].foreign_keys.values() if v not in placed)) not in path:
                path.append(parent)
            cycle = " -> ".join(path[path.index(parent):] + [parent])
            raise p.fail("", f"the foreign keys form a cycle {cycle}; rows must be applied parents first, "
                             "so remove one of these foreign keys")
        placed[ready.name] = None
        remaining.remove(ready)
    return tuple(specs[n] for n in placed)


def bind_profile(profile: Profile, conn: sqlite3.Connection) -> Profile:
    """Check ``profile`` against the database schema and fill each table's ``columns``.

    Args:
        profile: A profile from :func:`load_profile` or :func:`parse_profile`.
        conn: Connection to the app database.

    Returns:
        A copy of ``profile`` whose tables list their synced columns.

    Raises:
        ProfileError: A table or column is missing or wrong (see the module docstring); the message says which.
    """
    db, label, lookup = "the database", f"profile {profile.source or profile.name}", profile.facility
    try:
        files = _rows(conn, "PRAGMA database_list")
        db = str(files[0][2] or ":memory:") if files else db
        tables = {str(r[0]) for r in _rows(conn, "SELECT name FROM sqlite_master WHERE type = 'table'")}
        bound = tuple(_bind_table(label, conn, db, tables, t) for t in profile.tables)
        names = [c[0] for c in _columns(label, conn, db, tables, lookup.table)]
        for column, role in ((lookup.id_column, "id_column"), (lookup.dataset_column, "dataset_column")):
            if column not in names:
                raise ProfileError(f"{label}: facility {role} {column!r} is not a column of {lookup.table!r} "
                                   f"({db}); {_suggest(column, names)}fix the profile")
        if lookup.where:
            try:
                conn.execute(f"SELECT 1 FROM {_q(lookup.table)} WHERE ({lookup.where}) LIMIT 0")
            except sqlite3.Error as exc:
                raise ProfileError(f"{label}: facility 'where' {lookup.where!r} is not a valid condition on "
                                   f"{lookup.table!r}: {exc}; fix the SQL") from None
    except sqlite3.Error as exc:
        raise ProfileError(f"cannot read the schema of {db}: {exc}; check that it is the app's SQLite database"
                           ) from None
    return dataclasses.replace(profile, tables=bound)


def _rows(conn: sqlite3.Connection, sql: str) -> list[Any]:
    """Plain tuples whatever the connection's row factory is."""
    cursor = conn.cursor()
    cursor.row_factory = None
    return cursor.execute(sql).fetchall()


def _suggest(name: str, options: Iterable[str]) -> str:
    options = list(options)
    close = [o for o in options if o.lower() == name.lower()] or difflib.get_close_matches(name, options, 1)
    return f"did you mean {close[0]!r}? " if close else ""


def _columns(label: str, conn: sqlite3.Connection, db: str, tables: set[str],
             table: str) -> list[tuple[str, str, int]]:
    """``(name, declared type, position in the PRIMARY KEY)`` of each column of ``table``."""
    if table not in tables:
        raise ProfileError(f"{label}: table {table!r} is not a table of {db}; "
                           f"{_suggest(table, tables)}create it or fix the profile")
    return [(str(r[1]), str(r[2] or ""), int(r[5])) for r in _rows(conn, f"PRAGMA table_info({_q(table)})")]


def _bind_table(label: str, conn: sqlite3.Connection, db: str, tables: set[str], spec: TableSpec) -> TableSpec:
    info = _columns(label, conn, db, tables, spec.name)
    names = [c[0] for c in info]
    at = f"{label}: table {spec.name!r}"
    wanted = [(spec.primary_key, "primary_key"), (spec.dataset_column, "dataset_column")]
    wanted += [(c, "foreign_keys") for c in spec.foreign_keys]
    wanted += [(spec.self_reference, "self_reference")] if spec.self_reference else []
    wanted += [(c, "exclude") for c in sorted(spec.exclude)]
    wanted += [(c, "partition template variable") for c in spec.template_columns()]
    wanted += [(c, "receive") for c in spec.receive]
    wanted += [(c, f"used by receive {r.column!r}") for r in spec.receive.values() for c in r.columns]
    for column, role in wanted:
        if column not in names:
            raise ProfileError(f"{at}: column {column!r} ({role}) is not in the table ({db}); "
                               f"{_suggest(column, names)}fix the profile or the schema")
    for name in spec.lookups:
        if name in names:
            raise ProfileError(f"{at}: lookup {name!r} has the name of a column of the table; rename the lookup")
    types = {c[0]: c[1].upper() for c in info}
    for column in (v for v in spec.template_variables() if v not in spec.lookups):
        # SQLite's affinity rules (sqlite.org/datatype3.html 3.1): INT, then CHAR/CLOB/TEXT, BLOB, then REAL.
        if re.search("REAL|FLOA|DOUB", types[column]) and not re.search("INT|CHAR|CLOB|TEXT|BLOB", types[column]):
            raise ProfileError(f"{at}: partition column {column!r} has type {types[column]}, whose text differs "
                               "between SQL and Python; build partitions from TEXT or INTEGER columns")
    unique = [c[0] for c in info if c[2] > 0] == [spec.primary_key]
    indexes = _rows(conn, f"PRAGMA index_list({_q(spec.name)})")  # (seq, name, unique, origin, partial)
    # A single-column primary key without a "pk" index is a rowid alias (sqlite.org/lang_createtable.html#rowid).
    if unique and not any(index[3] == "pk" for index in indexes):
        raise ProfileError(
            f"{label}: primary key {spec.primary_key!r} of table {spec.name!r} is an INTEGER PRIMARY KEY, allocated "
            "per device: use a globally unique key such as a UUID text column")
    for index in [] if unique else indexes:
        # A partial index leaves the other rows unconstrained.
        if index[2] and not index[4]:
            unique = [r[2] for r in _rows(conn, f"PRAGMA index_info({_q(str(index[1]))})")] == [spec.primary_key]
            if unique:
                break
    if not unique:
        raise ProfileError(
            f"{at}: primary_key {spec.primary_key!r} is neither the table's single-column PRIMARY KEY nor covered "
            "by a single-column UNIQUE index: a table without a globally unique primary key cannot sync; "
            "give it a UUID primary key or a UNIQUE index")
    columns = tuple(n for n in names if n not in spec.exclude and n not in spec.receive)
    for _, column, _, notnull, default, pk in _rows(conn, f"PRAGMA table_info({_q(spec.name)})"):
        if column in spec.exclude and notnull and default is None and not pk:
            raise ProfileError(f"{at}: excluded column {column!r} is NOT NULL without a default, so a receiver could "
                               "not write the rows; give it a value under 'receive' or stop excluding it")
    bound = dataclasses.replace(spec, columns=columns)
    _check_sql(at, conn, bound)
    return bound


def incoming_row_sql(spec: TableSpec) -> str:
    """A one-row sub-select of the incoming row's synced columns and its partition, ``?`` for each, aliased NEW."""
    values = ", ".join(f"? AS {_q(c)}" for c in (*spec.columns, PARTITION_COLUMN))
    return f"(SELECT {values}) AS {_q(NEW)}"


def _check_sql(at: str, conn: sqlite3.Connection, spec: TableSpec) -> None:
    """Compile the lookups and receive expressions against the schema: mistakes fail at init, in one line."""
    checks = []
    if spec.lookups:
        checks.append(("the partition's lookups", f"SELECT {spec.partition_sql('t')} FROM {_q(spec.name)} AS t"))
        checks.append(("the partition's lookups on an incoming row",
                       f"SELECT {spec.partition_sql(NEW)} FROM {incoming_row_sql(spec)}"))
    for received in spec.receive.values():
        checks.append((f"receive {received.column!r}",
                       f"SELECT {received.expression(NEW)} FROM {incoming_row_sql(spec)}"))
    for what, sql in checks:
        try:
            conn.execute(sql + " LIMIT 0", [None] * sql.count("?")).fetchall()
        except sqlite3.Error as exc:
            raise ProfileError(f"{at}: {what} is not valid SQL on this schema ({exc}); fix the profile") from None
