-- maplookup schema: the truth behind Postfix's virtual-hosting maps.
--
-- Schema version 4 (maplookup/schema.py: SCHEMA_VERSION; older versions are upgraded there).
-- Applied by `maplookup db init`; every statement is idempotent, so applying it again
-- upgrades the lookup functions in place and leaves the data alone.
--
-- The lookup semantics live here, once, as SQL functions (one per map).  The server calls
-- them on a cache miss, and the pgsql: tables that virtual(8) needs (it refuses socketmap for
-- virtual_mailbox_maps / virtual_uid_maps / virtual_gid_maps, see src/global/dict_sockmap.c
-- and DICT_FLAG_PARANOID) call the very same functions, so both paths agree by construction.
--
-- Keys are stored in internal (unquoted) form, folded as Postfix folds table keys (full
-- Unicode case folding, src/util/casefold.c: `Straße` is stored `strasse`; the tools fold,
-- the constraints can only check that no ASCII capital is left), and split into (domain,
-- local_part); a catch-all has the empty local part and is written `@domain` by the tools.

CREATE SCHEMA IF NOT EXISTS maplookup;

CREATE TABLE IF NOT EXISTS maplookup.schema_version (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version integer NOT NULL
);
INSERT INTO maplookup.schema_version (version) VALUES (4)
    ON CONFLICT (singleton) DO NOTHING;

-- A domain is either a mailbox domain (virtual_mailbox_domains) or an alias domain
-- (virtual_alias_domains).  An alias domain is forwarding-only (its own aliases) or a mirror
-- of one mailbox domain (alias_of): user@mirror answers user@target.
CREATE TABLE IF NOT EXISTS maplookup.domains (
    name text PRIMARY KEY,
    kind text NOT NULL CHECK (kind IN ('mailbox', 'alias')),
    alias_of text,
    -- Constant 'mailbox' whenever alias_of is set, so that the composite foreign key below
    -- proves the mirror target is a mailbox domain (no chains, no loops).
    alias_of_kind text GENERATED ALWAYS AS
        (CASE WHEN alias_of IS NULL THEN NULL ELSE 'mailbox' END) STORED,
    default_uid integer CHECK (default_uid > 0),
    default_gid integer CHECK (default_gid > 0),
    enabled boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT domain_name_folded CHECK (name = translate(name, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')),
    CONSTRAINT domain_name_syntax CHECK (
        name ~ '^[^@[:space:][:cntrl:],]+$' AND length(name) <= 253
        AND name !~ '^\.' AND name !~ '\.$' AND name !~ '\.\.'),
    CONSTRAINT domain_kind_name UNIQUE (name, kind),
    CONSTRAINT alias_of_needs_alias_kind CHECK (alias_of IS NULL OR kind = 'alias'),
    CONSTRAINT ids_only_for_mailbox_domains CHECK (
        kind = 'mailbox' OR (default_uid IS NULL AND default_gid IS NULL)),
    CONSTRAINT alias_of_is_mailbox_domain FOREIGN KEY (alias_of, alias_of_kind)
        REFERENCES maplookup.domains (name, kind) ON UPDATE RESTRICT ON DELETE RESTRICT
);

-- Mailboxes live only in mailbox domains: the generated domain_kind column and the composite
-- foreign key make that a constraint, not a convention.
CREATE TABLE IF NOT EXISTS maplookup.mailboxes (
    domain text NOT NULL,
    local_part text NOT NULL,  -- '' is the catch-all mailbox @domain
    domain_kind text NOT NULL GENERATED ALWAYS AS ('mailbox') STORED,
    path text NOT NULL,        -- relative to virtual_mailbox_base; trailing '/' = Maildir
    uid integer CHECK (uid > 0),
    gid integer CHECK (gid > 0),
    enabled boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (domain, local_part),
    CONSTRAINT mailbox_in_mailbox_domain FOREIGN KEY (domain, domain_kind)
        REFERENCES maplookup.domains (name, kind) ON UPDATE RESTRICT ON DELETE RESTRICT,
    CONSTRAINT mailbox_local_part_folded CHECK (local_part = translate(local_part, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')),
    CONSTRAINT mailbox_local_part_syntax CHECK (
        local_part !~ '[[:space:][:cntrl:],]' AND length(local_part) <= 64),
    -- virtual(8) resolves the path below virtual_mailbox_base: keep it there.
    CONSTRAINT mailbox_path_relative CHECK (
        path <> '' AND path !~ '^/' AND path !~ '(^|/)\.\.(/|$)'
        AND path !~ '[[:cntrl:]]' AND length(path) <= 1024)
);

-- Aliases (virtual_alias_maps) in any hosted domain.  targets is a list of addresses in
-- internal (unquoted) form with their case as written (Postfix folds keys, never results):
-- user@domain, a local account name without '@' (Postfix appends @$myorigin), or, as the
-- sole target, '@other.tld', which keeps the received local part (src/global/mail_addr_map.c;
-- since Postfix 3.2 '@' is read only at the start of the whole result).
CREATE TABLE IF NOT EXISTS maplookup.aliases (
    domain text NOT NULL REFERENCES maplookup.domains (name)
        ON UPDATE RESTRICT ON DELETE RESTRICT,
    local_part text NOT NULL,  -- '' is the catch-all alias @domain
    targets text[] NOT NULL,
    enabled boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (domain, local_part),
    CONSTRAINT alias_local_part_folded CHECK (local_part = translate(local_part, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')),
    CONSTRAINT alias_local_part_syntax CHECK (
        local_part !~ '[[:space:][:cntrl:],]' AND length(local_part) <= 64),
    CONSTRAINT alias_has_targets CHECK (
        cardinality(targets) > 0 AND array_position(targets, NULL) IS NULL),
    -- Answers are quoted as Postfix quotes (the server and maplookup.quote_local), so a
    -- target may hold spaces and commas in its local part, but no control character (the
    -- server separates targets with newlines), no empty target, no empty domain, and
    -- '@domain' only alone.
    CONSTRAINT alias_targets_syntax CHECK (
        array_to_string(targets, '') !~ '[[:cntrl:]]'
        AND array_position(targets, '') IS NULL
        AND array_to_string(targets, E'\n') !~ '@(\n|$)'
        AND (cardinality(targets) = 1 OR array_to_string(targets, E'\n') !~ '(^|\n)@'))
);

-- ---------------------------------------------------------------------------------------
-- Lookup functions.  Each takes the key as Postfix sends it to a socketmap (the full address,
-- any case: socketmap tables are pattern tables, src/global/dict_sockmap.c, so Postfix sends no
-- fallback keys) and returns the answer or NULL for "not found".  They do the fallbacks a
-- hash: table gets from src/global/mail_addr_find.c themselves.  pgsql: tables, which do get
-- fallback keys, find the full key first, so they see the same answers.
-- ---------------------------------------------------------------------------------------

-- Keys arrive folded as Postfix folds them (src/util/casefold.c): the server folds what it
-- is sent, and Postfix folds what it sends to a pgsql: table (DICT_FLAG_FOLD_FIX), with full
-- Unicode case folding under smtputf8_enable = yes.  The functions fold only ASCII letters
-- on top: a collation's lower() would undo Unicode case folding for some letters (Cherokee
-- folds to its capitals), and folded text holds no ASCII capitals, so this is safe either way.
CREATE OR REPLACE FUNCTION maplookup.ascii_lower(t text)
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT AS $$
    SELECT translate(t, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')
$$;

-- The internal (unquoted) form of an address, as src/global/quote_822_local.c's
-- unquote_822_local: quotes and backslash escapes go from everything before the last '@' that
-- is outside quotes; the domain is kept as it is.  virtual(8) asks a pgsql: table the quoted
-- form first ("joe+odd user"@example.org), so the functions must read it as Postfix would.
CREATE OR REPLACE FUNCTION maplookup.unquote_local(address text)
RETURNS text LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE STRICT AS $$
DECLARE
    result text := '';
    in_quote boolean := false;
    bare_at_src integer := 0;
    bare_at_dst integer := 0;
    i integer := 1;
    n integer := length(address);
    c text;
BEGIN
    IF strpos(address, '"') = 0 AND strpos(address, '\') = 0 THEN
        RETURN address;
    END IF;
    WHILE i <= n LOOP
        c := substr(address, i, 1);
        IF NOT in_quote AND c = '@' THEN
            bare_at_src := i;
            bare_at_dst := length(result);
        END IF;
        IF c = '"' THEN
            in_quote := NOT in_quote;
        ELSIF c = '\' THEN
            IF i < n THEN
                i := i + 1;
                result := result || substr(address, i, 1);
            END IF;
        ELSE
            result := result || c;
        END IF;
        i := i + 1;
    END LOOP;
    IF bare_at_src > 0 THEN
        RETURN left(result, bare_at_dst) || substr(address, bare_at_src);
    END IF;
    RETURN result;
END
$$;

-- The external form of an internal address (quote_822_local): the local part, everything
-- before the last '@', is quoted unless it is a dot-atom; 8-bit characters are ordinary.
CREATE OR REPLACE FUNCTION maplookup.quote_local(address text)
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT AS $$
    SELECT CASE
        WHEN local_part ~ '^[^][()<>@,;:\\".[:space:][:cntrl:]]+(\.[^][()<>@,;:\\".[:space:][:cntrl:]]+)*$'
            THEN address
        ELSE '"' || replace(replace(local_part, '\', '\\'), '"', '\"') || '"' || rest
    END
    FROM (SELECT CASE WHEN at_pos = 0 THEN address ELSE left(address, at_pos - 1) END,
                 CASE WHEN at_pos = 0 THEN '' ELSE substr(address, at_pos) END
          FROM (SELECT CASE WHEN strpos(address, '@') = 0 THEN 0
                            ELSE length(address) - strpos(reverse(address), '@') + 1 END)
               AS p(at_pos)) AS parts(local_part, rest)
$$;

-- Split a key at its last '@' and the local part at its first recipient delimiter, the way
-- src/global/split_addr.c does: never split postmaster/mailer-daemon/double-bounce, nor
-- owner-*/*-request when '-' is a delimiter, nor when the base would be empty.  A quoted
-- local part is unquoted first (the extension is split on the internal form, as
-- src/global/mail_addr_find.c does).  Returns no row for a key that is not an address.
CREATE OR REPLACE FUNCTION maplookup.split_address(
    key text, delimiter text,
    OUT local_part text, OUT domain text, OUT base_part text, OUT extension text)
RETURNS SETOF record
-- ROWS 1: without it the planner assumes 1000 rows and scans whole tables in the callers.
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE ROWS 1 AS $$
DECLARE
    folded text := maplookup.ascii_lower(maplookup.unquote_local(key));
    at_pos integer;
    cut integer := 0;
    pos integer;
    i integer;
BEGIN
    at_pos := length(folded) - strpos(reverse(folded), '@') + 1;
    IF strpos(folded, '@') = 0 THEN
        RETURN;
    END IF;
    local_part := left(folded, at_pos - 1);
    domain := substr(folded, at_pos + 1);
    IF domain = '' THEN
        RETURN;
    END IF;
    IF coalesce(delimiter, '') <> '' AND local_part <> ''
       AND local_part NOT IN ('postmaster', 'mailer-daemon', 'double-bounce')
       AND NOT (strpos(delimiter, '-') > 0
                AND (local_part LIKE 'owner-%'
                     OR (length(local_part) > 8 AND local_part LIKE '%-request'))) THEN
        FOR i IN 1 .. length(delimiter) LOOP
            pos := strpos(local_part, substr(delimiter, i, 1));
            IF pos > 0 AND (cut = 0 OR pos < cut) THEN
                cut := pos;
            END IF;
        END LOOP;
    END IF;
    IF cut > 1 THEN
        base_part := left(local_part, cut - 1);
        extension := substr(local_part, cut);
    END IF;
    RETURN NEXT;
END
$$;

-- virtual_mailbox_domains
CREATE OR REPLACE FUNCTION maplookup.domains(key text)
RETURNS text LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT d.name FROM maplookup.domains d
    WHERE d.name = maplookup.ascii_lower(key) AND d.kind = 'mailbox' AND d.enabled
$$;

-- virtual_alias_domains (forwarding-only and mirror domains)
CREATE OR REPLACE FUNCTION maplookup.alias_domains(key text)
RETURNS text LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT d.name FROM maplookup.domains d
    WHERE d.name = maplookup.ascii_lower(key) AND d.kind = 'alias' AND d.enabled
$$;

-- The enabled mailbox an address delivers to: exact, then without extension, then the
-- catch-all (the order of src/global/mail_addr_find.c), with uid/gid resolved against the
-- domain default.  exact_only leaves out the catch-all.
CREATE OR REPLACE FUNCTION maplookup.find_mailbox(
    key text, delimiter text, include_catchall boolean DEFAULT true,
    OUT path text, OUT uid integer, OUT gid integer, OUT is_catchall boolean)
RETURNS SETOF record
-- plpgsql so that the split parts reach the query as parameters: the planner then uses the
-- (domain, local_part) primary key instead of joining whole tables.
LANGUAGE plpgsql STABLE PARALLEL SAFE ROWS 1 AS $$
DECLARE
    a record;
BEGIN
    SELECT * INTO a FROM maplookup.split_address(key, delimiter);
    IF NOT FOUND THEN
        RETURN;
    END IF;
    RETURN QUERY
    SELECT m.path, coalesce(m.uid, d.default_uid), coalesce(m.gid, d.default_gid),
           m.local_part = ''
    FROM maplookup.domains d
    JOIN maplookup.mailboxes m ON m.domain = d.name
    WHERE d.name = a.domain AND d.kind = 'mailbox' AND d.enabled AND m.enabled
      AND m.local_part IN (
          a.local_part,
          coalesce(a.base_part, a.local_part),
          CASE WHEN include_catchall THEN '' ELSE a.local_part END)
    ORDER BY CASE m.local_part WHEN a.local_part THEN 0 WHEN a.base_part THEN 1 ELSE 2 END
    LIMIT 1;
END
$$;

-- virtual_mailbox_maps
CREATE OR REPLACE FUNCTION maplookup.vmailbox(key text, delimiter text DEFAULT '+')
RETURNS text LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT f.path FROM maplookup.find_mailbox(key, delimiter) f
$$;

-- virtual_uid_maps and virtual_gid_maps: one rule for the socketmap server, the pgsql: tables
-- and an exported hash: table.  virtual(8) asks user+ext@d, user@d, then @d of every table
-- (src/global/mail_addr_find.c), so whatever '@d' answers is what any address of the domain
-- gets when its own keys answer nothing.  Hence:
--   a mailbox (exact, or without the extension): its own id, else the domain default, else
--     the configured default, else the catch-all mailbox's own id (what '@d' would give);
--   any other address of an enabled mailbox domain, and '@d' itself (the catch-all
--     mailbox's deliveries): the catch-all mailbox's own id, else the domain default, else
--     the configured default;
--   NULL (not found) outside enabled mailbox domains, or when none of these has a value.
CREATE OR REPLACE FUNCTION maplookup.mailbox_id(
    key text, delimiter text, default_id integer, want_uid boolean)
RETURNS integer LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
DECLARE
    a record;
    domain_default integer;
    catchall integer;
    own integer;
BEGIN
    SELECT * INTO a FROM maplookup.split_address(key, delimiter);
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT CASE WHEN want_uid THEN d.default_uid ELSE d.default_gid END INTO domain_default
    FROM maplookup.domains d WHERE d.name = a.domain AND d.kind = 'mailbox' AND d.enabled;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT CASE WHEN want_uid THEN c.uid ELSE c.gid END INTO catchall
    FROM maplookup.mailboxes c WHERE c.domain = a.domain AND c.local_part = '' AND c.enabled;
    IF a.local_part <> '' THEN
        SELECT CASE WHEN want_uid THEN m.uid ELSE m.gid END INTO own
        FROM maplookup.mailboxes m
        WHERE m.domain = a.domain AND m.enabled
          AND m.local_part IN (a.local_part, coalesce(a.base_part, a.local_part))
        ORDER BY m.local_part = a.local_part DESC
        LIMIT 1;
        IF FOUND THEN
            RETURN coalesce(own, domain_default, default_id, catchall);
        END IF;
    END IF;
    RETURN coalesce(catchall, domain_default, default_id);
END
$$;

CREATE OR REPLACE FUNCTION maplookup.uid(
    key text, delimiter text DEFAULT '+', default_uid integer DEFAULT NULL)
RETURNS text LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT maplookup.mailbox_id(key, delimiter, default_uid, true)::text
$$;

CREATE OR REPLACE FUNCTION maplookup.gid(
    key text, delimiter text DEFAULT '+', default_gid integer DEFAULT NULL)
RETURNS text LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT maplookup.mailbox_id(key, delimiter, default_gid, false)::text
$$;

-- virtual_alias_maps, as a match: what a hash: table holding the same data would match for
-- this key, and the targets it would return, before Postfix carries the received address onto
-- them.  One text value, so the server can cache it per folded key and apply the case of each
-- request (DESIGN.md section 2, fact 11): the kind of match, then the targets (internal form,
-- as stored), each on a line of its own:
--   'E' the key itself matched (targets as they are);
--   'B' the key without its extension matched (the received extension goes onto each target);
--   'C' the catch-all '@domain' matched (targets as they are, no extension).
-- A target '@other' (only ever the sole target) takes the received local part
-- (src/global/mail_addr_map.c).  The order of the tries (DESIGN.md section 3):
--   1. alias of the exact address;
--   2. alias of the address without extension;
--   3. in a mirror domain, the same address in the target domain, if it resolves there (an
--      export enumerates the mirror for a hash: table, so the match is exact, bare or, when
--      the target domain has a catch-all, the catch-all '@mirror -> @target');
--   4. if the domain has a catch-all alias: a mailbox answers for itself (the identity line
--      of a hash: table: a catch-all never swallows a mailbox), any other address gets the
--      catch-all's targets; without one, NOTFOUND.
CREATE OR REPLACE FUNCTION maplookup.virtual_match(key text, delimiter text DEFAULT '+')
RETURNS text LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
DECLARE
    a record;
    dom record;
    found_targets text[];
BEGIN
    SELECT * INTO a FROM maplookup.split_address(key, delimiter);
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT d.kind, d.alias_of INTO dom
    FROM maplookup.domains d WHERE d.name = a.domain AND d.enabled;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;

    IF a.local_part <> '' THEN
        SELECT al.targets INTO found_targets FROM maplookup.aliases al
        WHERE al.domain = a.domain AND al.local_part = a.local_part AND al.enabled;
        IF FOUND THEN
            RETURN 'E' || E'\n' || array_to_string(found_targets, E'\n');
        END IF;
        IF a.base_part IS NOT NULL THEN
            SELECT al.targets INTO found_targets FROM maplookup.aliases al
            WHERE al.domain = a.domain AND al.local_part = a.base_part AND al.enabled;
            IF FOUND THEN
                RETURN 'B' || E'\n' || array_to_string(found_targets, E'\n');
            END IF;
        END IF;
    END IF;

    IF dom.alias_of IS NOT NULL THEN
        -- Answer only for addresses that exist in the target domain, so that smtpd rejects
        -- unknown users of a mirror domain at RCPT instead of accepting and bouncing later.
        IF a.local_part <> '' AND maplookup.local_part_exists(dom.alias_of, a.local_part) THEN
            RETURN 'E' || E'\n' || a.local_part || '@' || dom.alias_of;
        END IF;
        IF a.base_part IS NOT NULL
           AND maplookup.local_part_exists(dom.alias_of, a.base_part) THEN
            RETURN 'B' || E'\n' || a.base_part || '@' || dom.alias_of;
        END IF;
        IF maplookup.local_part_exists(dom.alias_of, '') THEN
            RETURN 'C' || E'\n' || '@' || dom.alias_of;
        END IF;
        RETURN NULL;
    END IF;

    SELECT al.targets INTO found_targets FROM maplookup.aliases al
    WHERE al.domain = a.domain AND al.local_part = '' AND al.enabled;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    -- A catch-all alias never swallows a mailbox: the mailbox answers for itself, as the
    -- identity line (box@d box@d) does in a hash: table next to '@d' (cleanup lets an address
    -- expand into itself once, src/cleanup/cleanup_map1n.c).
    IF a.local_part <> '' THEN
        IF EXISTS (SELECT 1 FROM maplookup.mailboxes m WHERE m.domain = a.domain
                   AND m.local_part = a.local_part AND m.enabled) THEN
            RETURN 'E' || E'\n' || a.local_part || '@' || a.domain;
        END IF;
        IF a.base_part IS NOT NULL AND EXISTS (
            SELECT 1 FROM maplookup.mailboxes m WHERE m.domain = a.domain
            AND m.local_part = a.base_part AND m.enabled) THEN
            RETURN 'B' || E'\n' || a.base_part || '@' || a.domain;
        END IF;
    END IF;
    RETURN 'C' || E'\n' || array_to_string(found_targets, E'\n');
END
$$;

-- Whether an enabled mailbox or alias of an enabled domain has this exact local part ('' is
-- the catch-all mailbox or alias).
CREATE OR REPLACE FUNCTION maplookup.local_part_exists(domain_name text, local text)
RETURNS boolean LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT EXISTS (
        SELECT 1 FROM maplookup.mailboxes m JOIN maplookup.domains d ON d.name = m.domain
        WHERE m.domain = domain_name AND m.local_part = local AND m.enabled AND d.enabled)
    OR EXISTS (
        SELECT 1 FROM maplookup.aliases al JOIN maplookup.domains d ON d.name = al.domain
        WHERE al.domain = domain_name AND al.local_part = local AND al.enabled AND d.enabled)
$$;

-- The answer Postfix builds from a match (src/global/mail_addr_map.c, mail_addr_crunch.c):
-- a sole target '@other' becomes <local part>@other; after a match without the extension,
-- the extension goes before the last '@' of every other target (at the end of a local
-- account name); every address is then quoted as quote_822_local does, and the list is
-- joined with ','.  local_part and extension are those of the address as received.
CREATE OR REPLACE FUNCTION maplookup.render_targets(
    match text, local_part text, extension text)
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT string_agg(maplookup.quote_local(
        CASE WHEN left(t, 1) = '@' THEN local_part || t
             WHEN left(match, 1) <> 'B' OR extension IS NULL THEN t
             WHEN strpos(t, '@') = 0 THEN t || extension
             ELSE left(t, length(t) - strpos(reverse(t), '@')) || extension
                  || right(t, strpos(reverse(t), '@'))
        END), ',' ORDER BY n)
    FROM unnest((string_to_array(match, E'\n'))[2:]) WITH ORDINALITY AS u(t, n)
$$;

-- virtual_alias_maps for a pgsql: table (the server asks virtual_match and applies the
-- received case itself): the answer for the folded key, which is what Postfix sends a pgsql:
-- table (DICT_FLAG_FOLD_FIX).
CREATE OR REPLACE FUNCTION maplookup.virtual(key text, delimiter text DEFAULT '+')
RETURNS text LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT maplookup.render_targets(m, a.local_part, a.extension)
    FROM maplookup.virtual_match(key, delimiter) AS m,
         maplookup.split_address(key, delimiter) AS a
    WHERE m IS NOT NULL
$$;
-- ---------------------------------------------------------------------------------------
-- pgsql: tables of Postfix before 3.8 (Debian 12 has 3.7) talk to PostgreSQL in LATIN1
-- (src/global/dict_pgsql.c: PQsetClientEncoding(host->db, "LATIN1"), "Postfix does not send
-- multi-byte characters"), while the keys it sends are UTF-8 bytes: a UTF-8 server then reads
-- `zoë@x` as `zoÃ«@x`, and an answer holding `ë` reaches Postfix as one LATIN1 byte.  The
-- generated queries wrap the key and the answer in these two functions, which undo both
-- conversions when, and only when, the session is LATIN1 over a UTF-8 database (Postfix 3.8
-- and later say UTF8 by default: then they change nothing).
-- ---------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION maplookup.client_key(key text)
RETURNS text LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
BEGIN
    IF key IS NULL OR octet_length(key) = length(key)
       OR current_setting('client_encoding') <> 'LATIN1'
       OR current_setting('server_encoding') <> 'UTF8' THEN
        RETURN key;
    END IF;
    RETURN convert_from(convert_to(key, 'LATIN1'), 'UTF8');
EXCEPTION WHEN character_not_in_repertoire OR untranslatable_character
               OR invalid_parameter_value THEN
    RETURN NULL;  -- not UTF-8 bytes: no such key
END
$$;

CREATE OR REPLACE FUNCTION maplookup.client_value(value text)
RETURNS text LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
BEGIN
    IF value IS NULL OR octet_length(value) = length(value)
       OR current_setting('client_encoding') <> 'LATIN1'
       OR current_setting('server_encoding') <> 'UTF8' THEN
        RETURN value;
    END IF;
    -- Each UTF-8 byte as the LATIN1 character of that code: the conversion to the client's
    -- LATIN1 then hands Postfix the UTF-8 bytes themselves.
    RETURN convert_from(convert_to(value, 'UTF8'), 'LATIN1');
END
$$;

-- =======================================================================================
-- Change log (schema version 4, issue 15): the change feed, readable on a hot standby.
--
-- NOTIFY is not replayed on standbys and LISTEN is refused there, and a notification from
-- the primary can overtake the standby's replay (the lag race).  So the triggers below that
-- NOTIFY also append what changed to maplookup.change_log, and the server reads "every change
-- after position P" on the very database it reads lookups from: on a standby it only ever
-- invalidates what that standby has replayed, so the miss that follows an invalidation reads
-- the new rows (no lag race, by construction).  LISTEN, where it works (a primary), only wakes
-- the reader early.  Reader: maplookup/db/changes.py; the contract: maplookup/db/feed.py.
--
-- Positions are in commit order.  A plain sequence alone is not: a transaction that took
-- position 7 can commit after one that took 8, and a reader that has already read 8 would
-- skip 7 for ever.  So every writer first takes one transaction-scoped advisory lock
-- (pg_advisory_xact_lock(CHANGE_LOG_LOCK_ID), below as a literal), then the next value of a
-- sequence: the lock is released only after the commit is visible (and, for standbys, after
-- its commit record is in the WAL), so the next writer's positions are higher than every
-- position a reader can see before it, and a reader that sees position N sees every lower
-- position that will ever exist.  A sequence rather than max(position) + 1 because nextval
-- does not depend on the transaction's snapshot (a REPEATABLE READ writer would read a stale
-- max and collide).  Positions can have holes (a rolled-back writer, a crash): readers
-- never rely on them being consecutive.
--
-- The price: writers of the maps are serialised from their first change to their commit.
-- Admin writes are rare and short (one CLI command, one import); lookups never take the lock.
-- Two concurrent multi-statement transactions that also wait on each other's rows can now
-- deadlock; PostgreSQL detects it and aborts one, which the admin runs again.
--
-- Old rows are pruned by the writers themselves (every PRUNE_EVERY-th position, below as a
-- literal), not by a server: every server may be reading a standby, where nothing can be
-- deleted, and the reader's role needs no write privilege.  maplookup.change_feed holds the
-- retention and pruned_through, the highest position that may have been deleted: a reader
-- still at or before it has missed changes and must flush everything (changes_after says so
-- with a '*' row).
-- =======================================================================================

CREATE TABLE IF NOT EXISTS maplookup.change_feed (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- Rows older than this are pruned; a reader disconnected for longer flushes anyway.
    retention interval NOT NULL DEFAULT interval '1 hour' CHECK (retention > interval '0'),
    pruned_through bigint NOT NULL DEFAULT 0
);
INSERT INTO maplookup.change_feed DEFAULT VALUES ON CONFLICT (singleton) DO NOTHING;

CREATE SEQUENCE IF NOT EXISTS maplookup.change_log_position AS bigint;

CREATE TABLE IF NOT EXISTS maplookup.change_log (
    position bigint PRIMARY KEY,
    -- The domains whose answers may have changed; '{*}' means every domain.
    domains text[] NOT NULL CHECK (cardinality(domains) > 0),
    -- When the change was written (clock_timestamp(), under the lock: close to its commit).
    logged_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Delete rows older than the retention and move pruned_through past them.  Called by
-- log_change now and then; callable by hand (tests, an admin shrinking the log).
CREATE OR REPLACE FUNCTION maplookup.prune_change_log()
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    keep_from bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(7881704433701645927);  -- CHANGE_LOG_LOCK_ID ("maplchng")
    -- Positions follow time under the lock, so the first young row (by primary key) bounds
    -- what goes: cost proportional to the rows deleted, no index on logged_at needed.
    SELECT l.position INTO keep_from FROM maplookup.change_log l
    WHERE l.logged_at >= clock_timestamp() - (SELECT f.retention FROM maplookup.change_feed f)
    ORDER BY l.position LIMIT 1;
    IF keep_from IS NULL THEN
        SELECT max(l.position) + 1 INTO keep_from FROM maplookup.change_log l;
    END IF;
    IF keep_from IS NULL THEN
        RETURN 0;
    END IF;
    DELETE FROM maplookup.change_log l WHERE l.position < keep_from;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    UPDATE maplookup.change_feed SET pruned_through = greatest(pruned_through, keep_from - 1);
    RETURN keep_from - 1;
END
$$;

-- Append one change (called by notify_domains and on_truncate); returns its position.
CREATE OR REPLACE FUNCTION maplookup.log_change(affected text[])
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    new_position bigint;
BEGIN
    -- Held until commit: positions become visible in the order they were taken (see above).
    PERFORM pg_advisory_xact_lock(7881704433701645927);  -- CHANGE_LOG_LOCK_ID ("maplchng")
    new_position := nextval('maplookup.change_log_position');
    INSERT INTO maplookup.change_log (position, domains) VALUES (new_position, affected);
    IF new_position % 100 = 0 THEN  -- PRUNE_EVERY: the log holds about an hour plus 100 rows
        PERFORM maplookup.prune_change_log();
    END IF;
    RETURN new_position;
END
$$;

-- The two reader functions are SECURITY DEFINER (owner's rights, a fixed search_path, every
-- name schema-qualified): a server whose role was granted SELECT on the tables before this
-- version existed (deploy/README.md's maplookup_reader) reads the log without a new grant.

-- The position of the last change this database can see (0 before any): what a reader
-- starting now has seen, and, read in a REPEATABLE READ transaction before the maps, the
-- position a snapshot of the maps is consistent with.
CREATE OR REPLACE FUNCTION maplookup.change_log_head()
RETURNS bigint LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT greatest(
        (SELECT max(l.position) FROM maplookup.change_log l),
        (SELECT f.pruned_through FROM maplookup.change_feed f),
        0)
$$;

-- Every change after position `after`, oldest first, at most max_rows of them (one
-- statement: one snapshot).  When rows after `after` have been pruned, the first row is
-- (pruned_through, '{*}'): everything may have changed up to there.
CREATE OR REPLACE FUNCTION maplookup.changes_after(after bigint, max_rows integer)
RETURNS TABLE (change_position bigint, domains text[])
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT f.pruned_through, ARRAY['*'] FROM maplookup.change_feed f
    WHERE f.pruned_through > after
    UNION ALL
    (SELECT l.position, l.domains FROM maplookup.change_log l
     WHERE l.position > after ORDER BY l.position LIMIT max_rows)
    ORDER BY 1
$$;
-- ======================= end of the change log block (schema version 4) ================

-- ---------------------------------------------------------------------------------------
-- Change notification, for the server's cache (DESIGN.md section 5).
--
-- Every change NOTIFYs channel maplookup_changes with the comma-separated list of domains
-- whose answers may have changed (domain names cannot hold ','), or '*' for "everything"
-- (TRUNCATE, or a list too long for NOTIFY's 8000-byte payload).  Triggers are statement-level
-- with transition tables, so a 10,000-row statement sends one notification, and PostgreSQL
-- folds identical notifications within a transaction.  A mirror domain's answers depend on its
-- target's mailboxes and aliases, so a change in a domain also names the domains mirroring it.
-- ---------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION maplookup.notify_domains(changed text[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    affected text[];
    payload text;
BEGIN
    SELECT array_agg(DISTINCT d) INTO affected
    FROM (
        SELECT unnest(changed) AS d
        UNION
        SELECT m.name FROM maplookup.domains m WHERE m.alias_of = ANY (changed)
    ) AS affected_domains
    WHERE d IS NOT NULL;
    IF affected IS NULL THEN
        RETURN;
    END IF;
    -- The change log (schema version 4), read by servers on primaries and standbys alike;
    -- it has no payload limit, so it always names the domains.
    PERFORM maplookup.log_change(affected);
    payload := array_to_string(affected, ',');
    IF octet_length(payload) > 7000 THEN
        payload := '*';
    END IF;
    PERFORM pg_notify('maplookup_changes', payload);
END
$$;

CREATE OR REPLACE FUNCTION maplookup.on_record_change()
RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM maplookup.notify_domains(ARRAY(SELECT DISTINCT domain FROM new_rows));
    ELSIF TG_OP = 'UPDATE' THEN
        PERFORM maplookup.notify_domains(ARRAY(
            SELECT domain FROM new_rows UNION SELECT domain FROM old_rows));
    ELSE
        PERFORM maplookup.notify_domains(ARRAY(SELECT DISTINCT domain FROM old_rows));
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION maplookup.on_domain_change()
RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- A domain row names itself and the domain it mirrors (both before and after).
    IF TG_OP = 'INSERT' THEN
        PERFORM maplookup.notify_domains(ARRAY(
            SELECT name FROM new_rows UNION SELECT alias_of FROM new_rows));
    ELSIF TG_OP = 'UPDATE' THEN
        PERFORM maplookup.notify_domains(ARRAY(
            SELECT name FROM new_rows UNION SELECT alias_of FROM new_rows
            UNION SELECT name FROM old_rows UNION SELECT alias_of FROM old_rows));
    ELSE
        PERFORM maplookup.notify_domains(ARRAY(
            SELECT name FROM old_rows UNION SELECT alias_of FROM old_rows));
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION maplookup.on_truncate()
RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM maplookup.log_change(ARRAY['*']);  -- the change log (schema version 4)
    PERFORM pg_notify('maplookup_changes', '*');
    RETURN NULL;
END
$$;

-- Transition tables allow one event per trigger, hence three triggers per table.
CREATE OR REPLACE TRIGGER domains_notify_insert AFTER INSERT ON maplookup.domains
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION maplookup.on_domain_change();
CREATE OR REPLACE TRIGGER domains_notify_update AFTER UPDATE ON maplookup.domains
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION maplookup.on_domain_change();
CREATE OR REPLACE TRIGGER domains_notify_delete AFTER DELETE ON maplookup.domains
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION maplookup.on_domain_change();
CREATE OR REPLACE TRIGGER domains_notify_truncate AFTER TRUNCATE ON maplookup.domains
    FOR EACH STATEMENT EXECUTE FUNCTION maplookup.on_truncate();

CREATE OR REPLACE TRIGGER mailboxes_notify_insert AFTER INSERT ON maplookup.mailboxes
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION maplookup.on_record_change();
CREATE OR REPLACE TRIGGER mailboxes_notify_update AFTER UPDATE ON maplookup.mailboxes
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION maplookup.on_record_change();
CREATE OR REPLACE TRIGGER mailboxes_notify_delete AFTER DELETE ON maplookup.mailboxes
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION maplookup.on_record_change();
CREATE OR REPLACE TRIGGER mailboxes_notify_truncate AFTER TRUNCATE ON maplookup.mailboxes
    FOR EACH STATEMENT EXECUTE FUNCTION maplookup.on_truncate();

CREATE OR REPLACE TRIGGER aliases_notify_insert AFTER INSERT ON maplookup.aliases
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION maplookup.on_record_change();
CREATE OR REPLACE TRIGGER aliases_notify_update AFTER UPDATE ON maplookup.aliases
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION maplookup.on_record_change();
CREATE OR REPLACE TRIGGER aliases_notify_delete AFTER DELETE ON maplookup.aliases
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION maplookup.on_record_change();
CREATE OR REPLACE TRIGGER aliases_notify_truncate AFTER TRUNCATE ON maplookup.aliases
    FOR EACH STATEMENT EXECUTE FUNCTION maplookup.on_truncate();
