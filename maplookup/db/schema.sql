-- maplookup schema: the truth behind Postfix's virtual-hosting maps.
--
-- Schema version 6 (maplookup/schema.py: SCHEMA_VERSION; older versions are upgraded there).
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
INSERT INTO maplookup.schema_version (version) VALUES (6)
    ON CONFLICT (singleton) DO NOTHING;

-- A domain is a mailbox domain (virtual_mailbox_domains), an alias domain
-- (virtual_alias_domains) or a relay domain (relay_domains: this host relays it, as backup
-- MX or to an internal host).  An alias domain is forwarding-only (its own aliases) or a
-- mirror of one mailbox domain (alias_of): user@mirror answers user@target.  A backup MX for
-- the hosted domains themselves lists the domains and alias_domains maps in its relay_domains
-- (`maplookup postfix-config --backup-mx`): a host's role is its Postfix configuration, not data.
CREATE TABLE IF NOT EXISTS maplookup.domains (
    name text PRIMARY KEY,
    kind text NOT NULL CONSTRAINT domain_kind_values CHECK (kind IN ('mailbox', 'alias', 'relay')),
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
    -- The SASL login that owns this address (smtpd_sender_login_maps); the address itself
    -- unless set otherwise (trigger mailboxes_default_login), none for a catch-all.
    login text CONSTRAINT mailbox_login_syntax CHECK (
        login <> '' AND login !~ '[[:space:][:cntrl:],]' AND length(login) <= 320),
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

-- A new mailbox's login is its address, when that is a valid login (no space or comma, which
-- smtpd splits owner lists on: src/smtpd/smtpd_check.c, CHARS_COMMA_SP).
CREATE OR REPLACE FUNCTION maplookup.default_login()
RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.login IS NULL AND NEW.local_part <> ''
       AND NEW.local_part !~ '[[:space:][:cntrl:],]' THEN
        NEW.login := NEW.local_part || '@' || NEW.domain;
    END IF;
    RETURN NEW;
END
$$;
CREATE OR REPLACE TRIGGER mailboxes_default_login BEFORE INSERT ON maplookup.mailboxes
    FOR EACH ROW EXECUTE FUNCTION maplookup.default_login();

-- Explicit owners of sender addresses (smtpd_sender_login_maps), beyond the mailboxes' own
-- logins: login may use domain/local_part ('' = every address of the domain).  Any domain,
-- hosted here or not (a user may be allowed to send as an outside address).
CREATE TABLE IF NOT EXISTS maplookup.sender_grants (
    domain text NOT NULL,
    local_part text NOT NULL,
    login text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (domain, local_part, login),
    CONSTRAINT sender_grant_domain_syntax CHECK (
        domain = translate(domain, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')
        AND domain ~ '^[^@[:space:][:cntrl:],]+$' AND length(domain) <= 253),
    CONSTRAINT sender_grant_local_part_syntax CHECK (
        local_part = translate(local_part, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')
        AND local_part !~ '[[:space:][:cntrl:],]' AND length(local_part) <= 64),
    CONSTRAINT sender_grant_login_syntax CHECK (
        login <> '' AND login !~ '[[:space:][:cntrl:],]' AND length(login) <= 320)
);

-- Valid recipients of relay domains (relay_recipient_maps), beyond the mailboxes and aliases
-- of a hosted domain that a backup MX relays: local_part '' accepts every address.
CREATE TABLE IF NOT EXISTS maplookup.relay_recipients (
    domain text NOT NULL REFERENCES maplookup.domains (name)
        ON UPDATE RESTRICT ON DELETE RESTRICT,
    local_part text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (domain, local_part),
    CONSTRAINT relay_recipient_local_part_syntax CHECK (
        local_part = translate(local_part, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')
        AND local_part !~ '[[:space:][:cntrl:],]' AND length(local_part) <= 64)
);

-- transport(5) entries: domain is a domain ('example.com'), its subdomains ('.example.com'),
-- or the wildcard '*' (local_part ''); local_part names one address of the domain.
-- transport is `transport:nexthop` as transport(5) reads it.
CREATE TABLE IF NOT EXISTS maplookup.transports (
    domain text NOT NULL,
    local_part text NOT NULL DEFAULT '',
    transport text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (domain, local_part),
    CONSTRAINT transport_domain_syntax CHECK (
        domain = translate(domain, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')
        AND domain ~ '^[^@[:space:][:cntrl:],]+$' AND length(domain) <= 254
        AND domain !~ '\.$' AND domain !~ '\.\.'),
    CONSTRAINT transport_local_part_syntax CHECK (
        local_part = translate(local_part, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')
        AND local_part !~ '[[:space:][:cntrl:],]' AND length(local_part) <= 64),
    CONSTRAINT transport_address_in_a_domain CHECK (
        local_part = '' OR (domain <> '*' AND domain !~ '^\.')),
    CONSTRAINT transport_value_syntax CHECK (
        transport <> '' AND transport !~ '[[:cntrl:]]' AND length(transport) <= 1024)
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
-- domain default.  include_catchall = false leaves out the catch-all for any other address
-- (the key '@domain' itself still names it).
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
    FROM maplookup.domains d WHERE d.name = a.domain AND d.enabled AND d.kind <> 'relay';
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
-- The maps a virtual-hosting MX needs beyond delivery: smtpd_sender_login_maps
-- (sender_login), relay_domains, relay_recipient_maps (relay_recipients) and transport_maps
-- (transport).  Like the six above, each answers what Postfix gets from the hash: table that
-- `maplookup export` writes, doing the fallbacks Postfix does for hash: tables itself.
-- ---------------------------------------------------------------------------------------

-- A domain and its parent domains, most specific first, as match_hostname
-- (src/util/match_ops.c) and mail_addr_find (src/global/mail_addr_find.c) try them:
-- 'a.b.c' gives a.b.c, b.c, c when parent_domain_matches_subdomains lists the table
-- (relay_domains, by default), and a.b.c, .b.c, .c when it does not (transport_maps).
CREATE OR REPLACE FUNCTION maplookup.parent_domains(name text, dotted boolean)
RETURNS text[] LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE STRICT AS $$
DECLARE
    result text[] := ARRAY[name];
    rest text := name;
    pos integer;
BEGIN
    LOOP
        pos := strpos(substr(rest, 2), '.');  -- strchr(entry + 1, '.')
        EXIT WHEN pos = 0;
        rest := substr(rest, pos + 1);        -- '.parent'
        result := result || CASE WHEN dotted THEN rest ELSE substr(rest, 2) END;
    END LOOP;
    RETURN result;
END
$$;

-- relay_domains: the relay domain that is the key or one of its parent domains (what a
-- hash: table holding the domain does under Postfix's default parent_domain_matches_subdomains,
-- which lists relay_domains; export also writes '.domain' for the other setting).
CREATE OR REPLACE FUNCTION maplookup.relay_domains(key text)
RETURNS text LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT d.name
    FROM unnest(maplookup.parent_domains(maplookup.ascii_lower(key), false))
         WITH ORDINALITY AS p(name, n)
    JOIN maplookup.domains d ON d.name = p.name
    WHERE d.kind = 'relay' AND d.enabled
    ORDER BY p.n
    LIMIT 1
$$;

-- relay_recipient_maps: 'OK' for a valid recipient of an enabled domain (smtpd asks only for
-- addresses in relay domains, src/smtpd/smtpd_check.c, check_rcpt_maps): an explicit record
-- (the address, without its extension, or '@domain'), or, in a hosted domain (which a backup
-- MX relays), an address the primary MX accepts: an alias or a mailbox, catch-alls included.
-- A relay domain's subdomains have no records: their recipients are refused.
CREATE OR REPLACE FUNCTION maplookup.relay_recipients(key text, delimiter text DEFAULT '+')
RETURNS text LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
DECLARE
    a record;
    relay_kind text;
BEGIN
    SELECT * INTO a FROM maplookup.split_address(key, delimiter);
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT d.kind INTO relay_kind
    FROM maplookup.domains d WHERE d.name = a.domain AND d.enabled;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM maplookup.relay_recipients r
               WHERE r.domain = a.domain
                 AND r.local_part IN (a.local_part, coalesce(a.base_part, a.local_part), ''))
    THEN
        RETURN 'OK';
    END IF;
    IF relay_kind <> 'relay' AND (
        maplookup.virtual_match(key, delimiter) IS NOT NULL
        OR EXISTS (SELECT 1 FROM maplookup.find_mailbox(key, delimiter))) THEN
        RETURN 'OK';
    END IF;
    RETURN NULL;
END
$$;

-- transport_maps (transport(5), src/trivial-rewrite/transport.c): the address, the address
-- without its extension, the domain, then '.parent' entries (the default: transport_maps is
-- not in parent_domain_matches_subdomains).  The key '*' answers the wildcard entry, which
-- Postfix asks for by itself; an address never falls back to it here (nor in a hash: table).
-- A bare domain key answers as the domain part of an address would.
CREATE OR REPLACE FUNCTION maplookup.transport(key text, delimiter text DEFAULT '+')
RETURNS text LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
DECLARE
    a record;
    domain_name text;
    result text;
BEGIN
    IF key = '*' THEN
        SELECT t.transport INTO result FROM maplookup.transports t
        WHERE t.domain = '*' AND t.local_part = '';
        RETURN result;
    END IF;
    IF strpos(key, '@') = 0 THEN
        domain_name := maplookup.ascii_lower(key);
    ELSE
        SELECT * INTO a FROM maplookup.split_address(key, delimiter);
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
        domain_name := a.domain;
        IF a.local_part <> '' THEN
            SELECT t.transport INTO result FROM maplookup.transports t
            WHERE t.domain = a.domain
              AND t.local_part IN (a.local_part, coalesce(a.base_part, a.local_part))
            ORDER BY t.local_part = a.local_part DESC
            LIMIT 1;
            IF FOUND THEN
                RETURN result;
            END IF;
        END IF;
    END IF;
    SELECT t.transport INTO result
    FROM unnest(maplookup.parent_domains(domain_name, true)) WITH ORDINALITY AS p(name, n)
    JOIN maplookup.transports t ON t.domain = p.name AND t.local_part = ''
    ORDER BY p.n
    LIMIT 1;
    RETURN result;
END
$$;

-- The login of the enabled mailbox an address is delivered to (exact, else without its
-- extension; a catch-all mailbox has no login), or NULL, also when that mailbox has none:
-- an alias to user+ext@d delivered to the mailbox user+ext never makes user an owner.
CREATE OR REPLACE FUNCTION maplookup.mailbox_login(address text, delimiter text)
RETURNS text LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT m.login
    FROM maplookup.split_address(address, delimiter) a
    JOIN maplookup.domains d ON d.name = a.domain AND d.kind = 'mailbox' AND d.enabled
    JOIN maplookup.mailboxes m ON m.domain = a.domain AND m.enabled
        AND m.local_part IN (a.local_part, coalesce(a.base_part, a.local_part))
    WHERE a.local_part <> ''
    ORDER BY m.local_part = a.local_part DESC
    LIMIT 1
$$;

-- The logins of the mailboxes on this host that alias_address's targets (internal form, as
-- stored) are delivered to, expanding further aliases the way cleanup(8) does
-- (virtual_match, including mirror domains and catch-alls of the targets' domains); an
-- address that expands into itself or was seen before is final (src/cleanup/cleanup_map1n.c).
-- At most max_depth levels: Postfix's own default is virtual_alias_recursion_limit = 1000,
-- but an owner list deeper than a few levels is not something a sender should rely on.
CREATE OR REPLACE FUNCTION maplookup.delivered_logins(
    alias_address text, targets text[], delimiter text, max_depth integer DEFAULT 10)
RETURNS text[] LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
DECLARE
    frontier text[] := targets;
    next_frontier text[];
    seen text[] := ARRAY[alias_address];
    logins text[] := '{}';
    expanding text := alias_address;
    address text;
    target text;
    match text;
    expansion text[];
    depth integer := 0;
    login text;
BEGIN
    WHILE cardinality(frontier) > 0 AND depth < max_depth LOOP
        depth := depth + 1;
        next_frontier := '{}';
        FOREACH target IN ARRAY frontier LOOP
            address := maplookup.ascii_lower(target);
            CONTINUE WHEN strpos(address, '@') = 0;  -- a local account: not a virtual mailbox
            IF NOT address = ANY (seen) THEN
                seen := seen || address;
                match := maplookup.virtual_match(address, delimiter);
                IF match IS NOT NULL THEN
                    expansion := (string_to_array(match, E'\n'))[2:];
                    IF left(expansion[1], 1) = '@' THEN  -- '@other' keeps the local part
                        expansion := ARRAY[
                            left(address, length(address) - strpos(reverse(address), '@'))
                            || expansion[1]];
                    END IF;
                    IF NOT (cardinality(expansion) = 1
                            AND maplookup.ascii_lower(expansion[1]) = address) THEN
                        next_frontier := next_frontier || expansion;
                        CONTINUE;
                    END IF;
                END IF;
            END IF;
            login := maplookup.mailbox_login(address, delimiter);
            IF login IS NOT NULL THEN
                logins := logins || login;
            END IF;
        END LOOP;
        frontier := next_frontier;
    END LOOP;
    RETURN logins;
END
$$;

-- The grants of local@domain_name ('' for '@domain'): off while the domain is disabled, as
-- everything of a disabled domain is; a domain without a row (an outside address) has its
-- grants all the same.
CREATE OR REPLACE FUNCTION maplookup.sender_grants_of(local text, domain_name text)
RETURNS text[] LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT ARRAY(
        SELECT g.login FROM maplookup.sender_grants g
        WHERE g.domain = domain_name AND g.local_part = local
          AND NOT EXISTS (SELECT 1 FROM maplookup.domains d
                          WHERE d.name = domain_name AND NOT d.enabled))
$$;

-- Whether an enabled mailbox or alias is exactly local@domain_name (in a mirror domain: in
-- the mirrored domain, or an alias of the mirror's own), rather than an address that only
-- grants name.
CREATE OR REPLACE FUNCTION maplookup.has_own_record(local text, domain_name text)
RETURNS boolean LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT EXISTS (
        SELECT 1 FROM maplookup.domains d
        WHERE d.name = domain_name AND d.enabled AND d.kind <> 'relay'
          AND (EXISTS (SELECT 1 FROM maplookup.aliases al WHERE al.domain = d.name
                       AND al.local_part = local AND al.enabled)
               OR (d.kind = 'mailbox' AND EXISTS (
                       SELECT 1 FROM maplookup.mailboxes m WHERE m.domain = d.name
                       AND m.local_part = local AND m.enabled))
               OR (d.alias_of IS NOT NULL AND maplookup.has_own_record(local, d.alias_of))))
$$;

-- The owners of one exact address local@domain_name (no extension handling, no '@domain'
-- grants): explicit grants, the login of the mailbox it is, the mailboxes its alias delivers
-- to (a catch-all alias gives no ownership: its recipients may not send as every address),
-- and, in a mirror domain, the owners of the same address in the mirrored domain.
CREATE OR REPLACE FUNCTION maplookup.sender_owners(local text, domain_name text, delimiter text)
RETURNS text[] LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
DECLARE
    dom record;
    owners text[];
    alias_targets text[];
BEGIN
    owners := maplookup.sender_grants_of(local, domain_name);
    SELECT d.kind, d.alias_of INTO dom FROM maplookup.domains d
    WHERE d.name = domain_name AND d.enabled AND d.kind <> 'relay';
    IF NOT FOUND THEN
        RETURN owners;
    END IF;
    IF dom.kind = 'mailbox' THEN
        owners := owners || ARRAY(
            SELECT m.login FROM maplookup.mailboxes m
            WHERE m.domain = domain_name AND m.local_part = local AND m.enabled
              AND m.login IS NOT NULL);
    END IF;
    SELECT al.targets INTO alias_targets FROM maplookup.aliases al
    WHERE al.domain = domain_name AND al.local_part = local AND al.enabled;
    IF FOUND THEN
        IF left(alias_targets[1], 1) = '@' THEN
            alias_targets := ARRAY[local || alias_targets[1]];
        END IF;
        owners := owners || maplookup.delivered_logins(
            local || '@' || domain_name, alias_targets, delimiter);
    END IF;
    IF dom.alias_of IS NOT NULL THEN
        owners := owners || maplookup.sender_owners(local, dom.alias_of, delimiter);
    END IF;
    RETURN owners;
END
$$;

-- smtpd_sender_login_maps: every login that owns the sender address, sorted, joined by ','
-- (smtpd splits on commas and spaces and compares each with strcasecmp_utf8,
-- src/smtpd/smtpd_check.c, reject_auth_sender_login_mismatch).  The owners of the address;
-- the owners of the address without its extension too when the address has none, or is not
-- a mailbox or alias of its own (a grant of user+list@d adds an owner, it does not take
-- user's address from user); and the '@domain' grants (and, in a mirror domain, those of
-- the mirrored domain) in every answer of the domain.  Postfix stops at the first key that
-- matches, so one list must name every owner: export writes each key's whole answer.
CREATE OR REPLACE FUNCTION maplookup.sender_login(key text, delimiter text DEFAULT '+')
RETURNS text LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
DECLARE
    a record;
    mirrored text;
    owners text[] := '{}';
BEGIN
    SELECT * INTO a FROM maplookup.split_address(key, delimiter);
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF a.local_part <> '' THEN
        owners := maplookup.sender_owners(a.local_part, a.domain, delimiter);
        IF a.base_part IS NOT NULL AND (
            cardinality(owners) = 0
            OR NOT maplookup.has_own_record(a.local_part, a.domain)) THEN
            owners := owners || maplookup.sender_owners(a.base_part, a.domain, delimiter);
        END IF;
    END IF;
    SELECT d.alias_of INTO mirrored FROM maplookup.domains d
    WHERE d.name = a.domain AND d.enabled AND d.alias_of IS NOT NULL;
    owners := owners || maplookup.sender_grants_of('', a.domain);
    IF mirrored IS NOT NULL THEN
        owners := owners || maplookup.sender_grants_of('', mirrored);
    END IF;
    -- Sorted by code point (COLLATE "C"), not by the database's collation: the same data
    -- gives the same answer on every server (Postfix does not care about the order).
    RETURN (SELECT string_agg(DISTINCT o COLLATE "C", ',' ORDER BY o COLLATE "C")
            FROM unnest(owners) AS o);
END
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
-- Change log (schema version 5, issue 15): the change feed, readable on a hot standby.
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
    -- Schema version 6: the rows the change touched, 'table:local_part@domain' (a record
    -- table's key; no domain holds '@', so the last one splits it), when one statement
    -- changed at most 1000 rows of a record table; NULL for domain rows, larger statements and TRUNCATE.  A complete copy
    -- (cache.mode = "complete") re-reads just these rows instead of whole domains.
    records text[] CONSTRAINT change_records_not_empty CHECK (cardinality(records) > 0),
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
CREATE OR REPLACE FUNCTION maplookup.log_change(affected text[], changed_records text[] DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    new_position bigint;
BEGIN
    -- Held until commit: positions become visible in the order they were taken (see above).
    PERFORM pg_advisory_xact_lock(7881704433701645927);  -- CHANGE_LOG_LOCK_ID ("maplchng")
    new_position := nextval('maplookup.change_log_position');
    INSERT INTO maplookup.change_log (position, domains, records)
        VALUES (new_position, affected, changed_records);
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

-- The same with the rows each change touched (schema version 6; NULL: re-read its domains).
-- A new function rather than a new column of changes_after: a server of version 5 still
-- running when the database is upgraded keeps reading the log.
CREATE OR REPLACE FUNCTION maplookup.changes_with_records_after(after bigint, max_rows integer)
RETURNS TABLE (change_position bigint, domains text[], records text[])
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT f.pruned_through, ARRAY['*'], NULL::text[] FROM maplookup.change_feed f
    WHERE f.pruned_through > after
    UNION ALL
    (SELECT l.position, l.domains, l.records FROM maplookup.change_log l
     WHERE l.position > after ORDER BY l.position LIMIT max_rows)
    ORDER BY 1
$$;
-- ======================= end of the change log block (schema version 5) ================

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

CREATE OR REPLACE FUNCTION maplookup.notify_domains(
    changed text[], changed_records text[] DEFAULT NULL)
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
    -- The change log (schema version 5), read by servers on primaries and standbys alike;
    -- it has no payload limit, so it always names the domains.
    PERFORM maplookup.log_change(affected, changed_records);
    payload := array_to_string(affected, ',');
    IF octet_length(payload) > 7000 THEN
        payload := '*';
    END IF;
    PERFORM pg_notify('maplookup_changes', payload);
END
$$;

-- The keys of a record table's changed rows for the change log (schema version 6), or NULL
-- past 1000 rows (the reader then re-reads the domains: one statement beats 1000 keys).
CREATE OR REPLACE FUNCTION maplookup.record_keys(table_name text, keys text[])
RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN cardinality(keys) BETWEEN 1 AND 1000
        THEN ARRAY(SELECT table_name || ':' || k FROM unnest(keys) AS k) END
$$;

CREATE OR REPLACE FUNCTION maplookup.on_record_change()
RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Every record table is keyed by (domain, local_part) (sender_grants by login too: its
    -- key here is the address, whose logins are re-read together).
    IF TG_OP = 'INSERT' THEN
        PERFORM maplookup.notify_domains(
            ARRAY(SELECT DISTINCT domain FROM new_rows),
            maplookup.record_keys(TG_TABLE_NAME, ARRAY(
                SELECT DISTINCT local_part || '@' || domain FROM new_rows LIMIT 1001)));
    ELSIF TG_OP = 'UPDATE' THEN
        PERFORM maplookup.notify_domains(
            ARRAY(SELECT domain FROM new_rows UNION SELECT domain FROM old_rows),
            maplookup.record_keys(TG_TABLE_NAME, ARRAY(
                SELECT local_part || '@' || domain FROM new_rows
                UNION SELECT local_part || '@' || domain FROM old_rows LIMIT 1001)));
    ELSE
        PERFORM maplookup.notify_domains(
            ARRAY(SELECT DISTINCT domain FROM old_rows),
            maplookup.record_keys(TG_TABLE_NAME, ARRAY(
                SELECT DISTINCT local_part || '@' || domain FROM old_rows LIMIT 1001)));
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
    PERFORM maplookup.log_change(ARRAY['*']);  -- the change log (schema version 5)
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

-- The records of sender_login, relay_recipients and transport name their domain like the
-- others ('*', the wildcard transport, flushes everything).  The answers of sender_login,
-- relay_domains and transport can depend on other domains (alias targets, parent domains):
-- the server invalidates them on every change (maplookup/lookup/cache.py).
CREATE OR REPLACE TRIGGER sender_grants_notify_insert AFTER INSERT ON maplookup.sender_grants
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION maplookup.on_record_change();
CREATE OR REPLACE TRIGGER sender_grants_notify_update AFTER UPDATE ON maplookup.sender_grants
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION maplookup.on_record_change();
CREATE OR REPLACE TRIGGER sender_grants_notify_delete AFTER DELETE ON maplookup.sender_grants
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION maplookup.on_record_change();
CREATE OR REPLACE TRIGGER sender_grants_notify_truncate AFTER TRUNCATE ON maplookup.sender_grants
    FOR EACH STATEMENT EXECUTE FUNCTION maplookup.on_truncate();
CREATE OR REPLACE TRIGGER relay_recipients_notify_insert AFTER INSERT ON maplookup.relay_recipients
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION maplookup.on_record_change();
CREATE OR REPLACE TRIGGER relay_recipients_notify_update AFTER UPDATE ON maplookup.relay_recipients
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION maplookup.on_record_change();
CREATE OR REPLACE TRIGGER relay_recipients_notify_delete AFTER DELETE ON maplookup.relay_recipients
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION maplookup.on_record_change();
CREATE OR REPLACE TRIGGER relay_recipients_notify_truncate AFTER TRUNCATE ON maplookup.relay_recipients
    FOR EACH STATEMENT EXECUTE FUNCTION maplookup.on_truncate();
CREATE OR REPLACE TRIGGER transports_notify_insert AFTER INSERT ON maplookup.transports
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION maplookup.on_record_change();
CREATE OR REPLACE TRIGGER transports_notify_update AFTER UPDATE ON maplookup.transports
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION maplookup.on_record_change();
CREATE OR REPLACE TRIGGER transports_notify_delete AFTER DELETE ON maplookup.transports
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION maplookup.on_record_change();
CREATE OR REPLACE TRIGGER transports_notify_truncate AFTER TRUNCATE ON maplookup.transports
    FOR EACH STATEMENT EXECUTE FUNCTION maplookup.on_truncate();
