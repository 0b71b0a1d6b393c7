-- The cron evaluator: parse an expression once, then find the next slot after
-- any instant, in a time zone, without parsing again.
--
-- Why a parsed form. run_schedules runs every second from every dispatcher
-- (and maybe pg_cron), over up to tens of thousands of schedules. Parsing text
-- there would cost a regular-expression pass per field per schedule per call.
-- cron_parse turns an expression into a ledgerq.cron_spec once, when
-- schedule_task stores it: one bitmask per field (bit n set: value n
-- allowed), or a period in seconds for @every. Testing a value is then a
-- shift, and "the next allowed value at or after v" is the lowest set bit of
-- mask >> v, found with one exact floating-point logarithm of a power of two.
--
-- The language. Five fields, minute hour day-of-month month day-of-week, each
-- a comma list of `*`, `n`, `a-b`, with an optional `/step` (`*/15`, `1-30/5`,
-- and `5/15`, meaning 5 to the field's maximum by 15). Months take JAN-DEC and
-- days of week SUN-SAT, in any case; day of week runs 0-7, 0 and 7 both
-- Sunday. When both day fields are restricted, a day matches if either does;
-- when either starts with `*` (even `*/2`), both must: Vixie cron's rule, which
-- cronie and most crontabs follow. Macros: @hourly, @daily (= @midnight),
-- @weekly (Sunday), @monthly, @yearly (= @annually), and @every <interval>
-- (`@every 90 seconds`, `@every 5 minutes`, `@every 1 day`): a whole number of
-- seconds, at least one, without months (a month has no fixed length).
-- Anything else raises LQ422 with a message naming the part.
--
-- Time zones and DST. A five-field expression describes wall-clock minutes in
-- the schedule's time zone; a slot is the instant such a minute happens. Where
-- clocks spring forward, the minutes in the gap never happen, so they are no
-- slot (a `30 2 * * *` job does not run that night). Where clocks fall back,
-- the repeated minutes are slots only the first time: each wall-clock minute
-- runs once, at its earlier instant (so on that night even `*/5 * * * *`
-- pauses while the clock repeats its hour). cron_local_next searches wall-clock
-- time, which has no DST; cron_local_instant maps a wall-clock minute to its
-- first instant, or to nothing; cron_next ties them together and keeps only
-- instants after the one asked about (in the repeated hour, wall-clock time
-- runs behind). @every ignores the time zone: its slots are multiples of the
-- period since 1970-01-01 00:00 UTC, the same for every caller, whatever the
-- clocks do.

-- Bit helpers. Plain SQL expressions, so PostgreSQL inlines them into the
-- PL/pgSQL expressions that call them (no function call per use).

-- The lowest set bit of mask at or above position `from` (0-63), or NULL.
-- m & -m isolates the lowest set bit; a power of two is exact in a double, and
-- so is the rounded logarithm of it.
CREATE OR REPLACE FUNCTION ledgerq.cron_bit_next(mask bigint, from_bit integer) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN from_bit > 63 OR mask >> from_bit = 0 THEN NULL
                ELSE from_bit + round(ln(((mask >> from_bit) & -(mask >> from_bit))::double precision)
                                      / ln(2::double precision))::integer
           END
$$;

-- A mask with bits lo..hi set, every step-th one.
CREATE OR REPLACE FUNCTION ledgerq.cron_bit_range(lo integer, hi integer, step integer) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(bit_or(1::bigint << v), 0) FROM generate_series(lo, hi, step) AS v
$$;

-- Days in a month of the proleptic Gregorian calendar.
CREATE OR REPLACE FUNCTION ledgerq.cron_month_days(year integer, month integer) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN month = 2 THEN
            CASE WHEN year % 4 = 0 AND (year % 100 <> 0 OR year % 400 = 0) THEN 29 ELSE 28 END
        WHEN month IN (4, 6, 9, 11) THEN 30
        ELSE 31
    END
$$;

-- One field of a five-field expression: its bitmask, or LQ422 naming the
-- field (`cron field 2 (hour): 25 is out of range 0-23`).
CREATE OR REPLACE FUNCTION ledgerq.cron_field_parse(field_no integer, field text) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    field_name text := (ARRAY['minute', 'hour', 'day-of-month', 'month', 'day-of-week'])[field_no];
    lo_limit integer := (ARRAY[0, 0, 1, 1, 0])[field_no];
    hi_limit integer := (ARRAY[59, 23, 31, 12, 7])[field_no];
    names text[] := CASE field_no
        WHEN 4 THEN ARRAY['JAN', 'FEB', 'MAR', 'APR', 'MAY', 'JUN', 'JUL', 'AUG', 'SEP', 'OCT', 'NOV', 'DEC']
        WHEN 5 THEN ARRAY['SUN', 'MON', 'TUE', 'WED', 'THU', 'FRI', 'SAT']
    END;
    prefix text := format('cron field %s (%s): ', field_no, field_name);
    item text;
    parts text[];
    bounds text[];
    lo integer;
    hi integer;
    step integer;
    value_text text;
    values_found integer[];
    i integer;
    mask bigint := 0;
BEGIN
    FOREACH item IN ARRAY string_to_array(field, ',') LOOP
        IF item = '' THEN
            RAISE EXCEPTION USING ERRCODE = 'LQ422',
                MESSAGE = prefix || format('empty item in list %L', field);
        END IF;
        parts := string_to_array(item, '/');
        IF cardinality(parts) > 2 THEN
            RAISE EXCEPTION USING ERRCODE = 'LQ422', MESSAGE = prefix || format('%L has more than one step', item);
        END IF;
        step := 1;
        IF cardinality(parts) = 2 THEN
            IF parts[2] !~ '^[0-9]{1,4}$' THEN
                RAISE EXCEPTION USING ERRCODE = 'LQ422',
                    MESSAGE = prefix || format('step %L is not a positive number', parts[2]);
            END IF;
            step := parts[2]::integer;
            IF step < 1 THEN
                RAISE EXCEPTION USING ERRCODE = 'LQ422',
                    MESSAGE = prefix || format('step must be at least 1, got %s', step);
            END IF;
        END IF;

        IF parts[1] = '*' THEN
            lo := lo_limit;
            hi := CASE WHEN field_no = 5 THEN 6 ELSE hi_limit END;  -- 7 would repeat Sunday
        ELSE
            bounds := string_to_array(parts[1], '-');
            IF cardinality(bounds) > 2 THEN
                RAISE EXCEPTION USING ERRCODE = 'LQ422', MESSAGE = prefix || format('%L is not a range', parts[1]);
            END IF;
            values_found := '{}';
            FOREACH value_text IN ARRAY bounds LOOP
                IF value_text ~ '^[0-9]{1,4}$' THEN
                    i := value_text::integer;
                ELSIF names IS NOT NULL AND upper(value_text) = ANY (names) THEN
                    i := array_position(names, upper(value_text)) - 1 + lo_limit;
                ELSIF value_text = '' OR value_text = '*' THEN
                    RAISE EXCEPTION USING ERRCODE = 'LQ422',
                        MESSAGE = prefix || format('%L is not a value or a range', parts[1]);
                ELSE
                    RAISE EXCEPTION USING ERRCODE = 'LQ422',
                        MESSAGE = prefix || format('%L is not a number%s', value_text,
                            CASE field_no WHEN 4 THEN ' or a month name (JAN-DEC)'
                                          WHEN 5 THEN ' or a day name (SUN-SAT)' ELSE '' END);
                END IF;
                IF i NOT BETWEEN lo_limit AND hi_limit THEN
                    RAISE EXCEPTION USING ERRCODE = 'LQ422',
                        MESSAGE = prefix || format('%s is out of range %s-%s', i, lo_limit, hi_limit);
                END IF;
                values_found := values_found || i;
            END LOOP;
            lo := values_found[1];
            IF cardinality(values_found) = 2 THEN
                hi := values_found[2];
                IF hi < lo THEN
                    RAISE EXCEPTION USING ERRCODE = 'LQ422',
                        MESSAGE = prefix || format('range %L runs backwards (%s is after %s)', parts[1], lo, hi);
                END IF;
            ELSIF cardinality(parts) = 2 THEN
                hi := hi_limit;  -- `5/15`: from 5 to the field's maximum
            ELSE
                hi := lo;
            END IF;
        END IF;
        mask := mask | ledgerq.cron_bit_range(lo, hi, step);
    END LOOP;

    IF field_no = 5 AND mask & (1::bigint << 7) <> 0 THEN
        mask := (mask & ~(1::bigint << 7)) | 1;  -- 7 is Sunday, as is 0
    END IF;
    RETURN mask;
END;
$$;

-- Parse a cron expression (see the top of this file) into a cron_spec, or
-- raise LQ422 naming the part that is wrong.
CREATE OR REPLACE FUNCTION ledgerq.cron_parse(cron text) RETURNS ledgerq.cron_spec
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    expr text := btrim(cron, E' \t\r\n');
    macro text;
    every_text text;
    every interval;
    every_s numeric;
    fields text[];
    spec ledgerq.cron_spec;
    month_no integer;
    fits boolean := false;
BEGIN
    IF expr IS NULL OR expr = '' THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ422', MESSAGE = 'cron must be a non-empty expression';
    END IF;

    IF left(expr, 1) = '@' THEN
        macro := lower(split_part(regexp_replace(expr, '\s+', ' ', 'g'), ' ', 1));
        IF macro = '@every' THEN
            every_text := btrim(substr(expr, 7), E' \t\r\n');
            IF every_text = '' THEN
                RAISE EXCEPTION USING ERRCODE = 'LQ422',
                    MESSAGE = 'cron @every needs an interval, e.g. ''@every 30 seconds''';
            END IF;
            BEGIN
                every := every_text::interval;
            EXCEPTION WHEN data_exception THEN
                RAISE EXCEPTION USING ERRCODE = 'LQ422',
                    MESSAGE = format('cron @every: %L is not an interval', every_text);
            END;
            IF extract(month FROM every) <> 0 OR extract(year FROM every) <> 0 THEN
                RAISE EXCEPTION USING ERRCODE = 'LQ422',
                    MESSAGE = format('cron @every: %L has months, which have no fixed length; use @monthly or a day-of-month field', every_text);
            END IF;
            every_s := extract(epoch FROM every);
            IF every_s < 1 THEN
                RAISE EXCEPTION USING ERRCODE = 'LQ422',
                    MESSAGE = format('cron @every: the interval must be at least 1 second, got %L', every_text);
            END IF;
            IF every_s <> trunc(every_s) THEN
                RAISE EXCEPTION USING ERRCODE = 'LQ422',
                    MESSAGE = format('cron @every: the interval must be a whole number of seconds, got %L', every_text);
            END IF;
            RETURN ROW(every_s::bigint, 0, 0, 0, 0, 0, false)::ledgerq.cron_spec;
        END IF;
        IF expr ~ '\s' THEN
            RAISE EXCEPTION USING ERRCODE = 'LQ422',
                MESSAGE = format('cron macro %s takes no arguments, got %L', macro, expr);
        END IF;
        expr := CASE macro
            WHEN '@hourly' THEN '0 * * * *'
            WHEN '@daily' THEN '0 0 * * *'
            WHEN '@midnight' THEN '0 0 * * *'
            WHEN '@weekly' THEN '0 0 * * 0'
            WHEN '@monthly' THEN '0 0 1 * *'
            WHEN '@yearly' THEN '0 0 1 1 *'
            WHEN '@annually' THEN '0 0 1 1 *'
        END;
        IF expr IS NULL THEN
            RAISE EXCEPTION USING ERRCODE = 'LQ422',
                MESSAGE = format('cron: unknown macro %L (known: @hourly, @daily, @midnight, @weekly, @monthly, @yearly, @annually, @every <interval>)', macro);
        END IF;
    END IF;

    fields := regexp_split_to_array(expr, '\s+');
    IF cardinality(fields) <> 5 THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ422',
            MESSAGE = format('cron expression must have 5 fields (minute hour day-of-month month day-of-week), got %s in %L',
                             cardinality(fields), expr);
    END IF;

    spec.every_seconds := 0;
    spec.minutes := ledgerq.cron_field_parse(1, fields[1]);
    spec.hours := ledgerq.cron_field_parse(2, fields[2]);
    spec.days := ledgerq.cron_field_parse(3, fields[3]);
    spec.months := ledgerq.cron_field_parse(4, fields[4]);
    spec.weekdays := ledgerq.cron_field_parse(5, fields[5]);
    spec.days_or_weekdays := left(fields[3], 1) <> '*' AND left(fields[5], 1) <> '*';

    -- Where both day fields must match, some allowed month has to have some
    -- allowed day (February counting its 29th), or the search for a next slot
    -- would never end. Any such date falls on every weekday in some year.
    IF NOT spec.days_or_weekdays THEN
        FOR month_no IN 1..12 LOOP
            IF spec.months >> month_no & 1 = 1
               AND spec.days & ledgerq.cron_bit_range(1, ledgerq.cron_month_days(2000, month_no), 1) <> 0 THEN
                fits := true;
            END IF;
        END LOOP;
        IF NOT fits THEN
            RAISE EXCEPTION USING ERRCODE = 'LQ422',
                MESSAGE = format('cron field 3 (day-of-month): %L never occurs in the months of field 4 (month) %L',
                                 fields[3], fields[4]);
        END IF;
    END IF;
    RETURN spec;
END;
$$;

-- The first wall-clock minute at or after from_local (a whole minute) that the
-- five-field spec matches. Wall-clock time has no DST; cron_next deals with it.
-- Jumps field by field: a month that is not allowed skips to the next allowed
-- month, an hour to the next allowed hour, and so on, so a search visits a
-- handful of candidates, not every minute. cron_parse guarantees a match
-- exists; the guard only turns a bug into an error instead of a hang.
CREATE OR REPLACE FUNCTION ledgerq.cron_local_next(spec ledgerq.cron_spec, from_local timestamp)
RETURNS timestamp
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    y integer := extract(year FROM from_local);
    mo integer := extract(month FROM from_local);
    d integer := extract(day FROM from_local);
    h integer := extract(hour FROM from_local);
    mi integer := extract(minute FROM from_local);
    n integer;
    day_fits boolean;
    weekday integer;
    guard integer := 0;
BEGIN
    LOOP
        guard := guard + 1;
        IF guard > 100000 THEN
            RAISE EXCEPTION 'cron_local_next: no match found from % for %', from_local, spec;
        END IF;

        IF spec.months >> mo & 1 = 0 THEN
            n := ledgerq.cron_bit_next(spec.months, mo + 1);
            IF n IS NULL THEN
                y := y + 1;
                n := ledgerq.cron_bit_next(spec.months, 1);
            END IF;
            mo := n; d := 1; h := 0; mi := 0;
        END IF;
        IF d > ledgerq.cron_month_days(y, mo) THEN
            mo := mo + 1; d := 1; h := 0; mi := 0;
            IF mo > 12 THEN
                mo := 1; y := y + 1;
            END IF;
            CONTINUE;
        END IF;

        weekday := extract(dow FROM make_date(y, mo, d));
        IF spec.days_or_weekdays THEN
            day_fits := spec.days >> d & 1 = 1 OR spec.weekdays >> weekday & 1 = 1;
        ELSE
            day_fits := spec.days >> d & 1 = 1 AND spec.weekdays >> weekday & 1 = 1;
        END IF;
        IF NOT day_fits THEN
            IF spec.days_or_weekdays THEN
                d := d + 1;  -- some weekday matches within a week
            ELSE
                d := coalesce(ledgerq.cron_bit_next(spec.days, d + 1), 32);  -- 32: next month
            END IF;
            h := 0; mi := 0;
            CONTINUE;
        END IF;

        IF spec.hours >> h & 1 = 0 THEN
            n := ledgerq.cron_bit_next(spec.hours, h + 1);
            IF n IS NULL THEN
                d := d + 1; h := 0; mi := 0;
                CONTINUE;
            END IF;
            h := n; mi := 0;
        END IF;

        IF spec.minutes >> mi & 1 = 0 THEN
            n := ledgerq.cron_bit_next(spec.minutes, mi + 1);
            IF n IS NULL THEN
                h := h + 1; mi := 0;
                IF h > 23 THEN
                    d := d + 1; h := 0;
                END IF;
                CONTINUE;
            END IF;
            mi := n;
        END IF;

        RETURN make_timestamp(y, mo, d, h, mi, 0);
    END LOOP;
END;
$$;

-- The instant a wall-clock time happens in time zone tz: the earlier one if
-- it happens twice (clocks fell back), NULL if it never happens (clocks
-- sprang forward over it). PostgreSQL itself reads an ambiguous local time as
-- the later instant and a missing one with the offset before the change, so
-- both cases are checked by converting back.
CREATE OR REPLACE FUNCTION ledgerq.cron_local_instant(local_time timestamp, tz text)
RETURNS timestamptz
LANGUAGE plpgsql STABLE STRICT PARALLEL SAFE AS $$
DECLARE
    instant timestamptz;
    earlier timestamptz;
BEGIN
    IF tz = 'UTC' THEN
        RETURN local_time AT TIME ZONE 'UTC';
    END IF;
    instant := local_time AT TIME ZONE tz;
    IF instant AT TIME ZONE tz <> local_time THEN
        RETURN NULL;  -- in a gap
    END IF;
    -- Read with the offset in force a day before: if that also lands on this
    -- wall-clock time, earlier, the time happened twice. (Offsets never change
    -- twice within a day.)
    earlier := (local_time - ((instant - interval '1 day') AT TIME ZONE tz
                              - (instant - interval '1 day') AT TIME ZONE 'UTC')) AT TIME ZONE 'UTC';
    IF earlier < instant AND earlier AT TIME ZONE tz = local_time THEN
        RETURN earlier;
    END IF;
    RETURN instant;
END;
$$;

-- The first slot of spec in time zone tz strictly after `after`.
CREATE OR REPLACE FUNCTION ledgerq.cron_next(spec ledgerq.cron_spec, tz text, after timestamptz)
RETURNS timestamptz
LANGUAGE plpgsql STABLE STRICT PARALLEL SAFE AS $$
DECLARE
    candidate timestamp;
    found timestamp;
    instant timestamptz;
    guard integer := 0;
BEGIN
    IF spec.every_seconds > 0 THEN
        RETURN to_timestamp((floor(extract(epoch FROM after) / spec.every_seconds) + 1) * spec.every_seconds);
    END IF;
    -- Wall-clock minutes after the local time of `after`. In a repeated hour
    -- the wall clock runs behind, so a minute found there may still map to an
    -- instant at or before `after`: keep searching past it.
    candidate := date_trunc('minute', after AT TIME ZONE tz) + interval '1 minute';
    LOOP
        found := ledgerq.cron_local_next(spec, candidate);
        instant := ledgerq.cron_local_instant(found, tz);
        IF instant > after THEN
            RETURN instant;
        END IF;
        candidate := found + interval '1 minute';
        guard := guard + 1;
        IF guard > 10000 THEN
            RAISE EXCEPTION 'cron_next: no slot found after % in % for %', after, tz, spec;
        END IF;
    END LOOP;
END;
$$;

-- NULL for a time zone PostgreSQL knows, else the problem. AT TIME ZONE also
-- takes POSIX strings such as 'Mars+3' (an offset with a made-up name, and
-- west of Greenwich positive), which would be a surprise in a schedule: a name
-- with a digit must be in the time zone database ('Etc/GMT+5', 'EST5EDT').
CREATE OR REPLACE FUNCTION ledgerq.cron_timezone_problem(tz text) RETURNS text
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF tz IS NULL OR btrim(tz) = '' THEN
        RETURN 'timezone must be a time zone name such as ''UTC'' or ''Europe/Berlin''';
    END IF;
    BEGIN
        PERFORM now() AT TIME ZONE tz;
    EXCEPTION WHEN invalid_parameter_value OR feature_not_supported THEN
        RETURN format('unknown time zone %L', tz);
    END;
    IF tz ~ '[0-9<>,:]' AND NOT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = tz) THEN
        RETURN format('unknown time zone %L (use a name from the time zone database, e.g. ''Etc/GMT-3'')', tz);
    END IF;
    RETURN NULL;
END;
$$;
