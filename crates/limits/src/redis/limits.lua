-- portcullis limits: the one script behind `portcullis_limits::redis` (mod.rs documents the
-- key layout, the arguments and the reply). ARGV[1] is the mode: 'c' for a check (stick-table
-- entries, a usage-plan bucket, a quota), 'f' for a batch of finished responses, 'r' to give
-- back what a lease (local batching, batch.rs) took and did not use.
--
-- Lua numbers are doubles: integers are exact below 2^53, so the time is kept in microseconds
-- (about 1.7e15 now) and every count that could grow past that travels as a string and is
-- changed only by HINCRBY / INCRBY, which are exact 64-bit operations in Redis itself.

-- Redis 5 and 6 replicate a script verbatim unless told to replicate its effects, and refuse
-- a write after TIME; Redis 7 always replicates effects (the call is a no-op there).
if redis.replicate_commands then
  pcall(redis.replicate_commands)
end

local time = redis.call('TIME')
-- Microseconds since the Unix epoch, from Redis: every process sharing this server agrees.
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])

-- A whole number as a string, never in exponent form (tostring would give 1.7e+15).
local function int(x)
  return string.format('%.0f', x)
end

-- HINCRBY that saturates at the largest 64-bit integer instead of failing the script.
local function incr(key, field, n)
  local r = redis.pcall('HINCRBY', key, field, n)
  if type(r) == 'table' and r.err then
    redis.call('HSET', key, field, '9223372036854775807')
  end
end

-- Adds n events to the sliding window `c` of hash `key` at window index idx. The window is
-- three fields: c..'w' the index of the current window, c..'c' its count, c..'p' the count of
-- the window before it. Mirrors WindowState::add with N = 2: an index up to 2 windows older
-- than the stored one (a replica's clock a little behind) counts in the current window; one
-- window ahead shifts current to previous; anything else starts afresh.
local function window_add(key, c, idx, n)
  local v = redis.call('HMGET', key, c .. 'w', c .. 'c')
  local w = tonumber(v[1])
  if w ~= nil and (w == idx or (w > idx and w - idx <= 2)) then
    incr(key, c .. 'c', n)
  elseif w ~= nil and w == idx - 1 then
    redis.call('HSET', key, c .. 'w', int(idx), c .. 'c', n, c .. 'p', v[2] or '0')
  else
    redis.call('HSET', key, c .. 'w', int(idx), c .. 'c', n, c .. 'p', '0')
  end
end

-- Stores a bucket's theoretical arrival time (ta whole µs and tf units), to be forgotten
-- once the bucket is full again: the same as never seen.
local function set_tat(key, ta, tf)
  local left_us = ta - now
  if tf > 0 then
    left_us = left_us + 1
  end
  local ms = math.ceil(left_us / 1000)
  if ms < 1 then
    ms = 1
  end
  redis.call('SET', key, int(ta) .. ' ' .. int(tf), 'PX', int(ms))
end

-- One stick-table entry. `spec` lists the counters the table stores, space-separated: a rate
-- is its letter and its period in microseconds ('r10000000'), a plain counter its letter
-- alone ('R'). Letters: r http_req_rate, R http_req_cnt, e http_err_rate, E http_err_cnt,
-- i bytes_in_rate, o bytes_out_rate, g gpc0, T tags (read only here; mode 'T' sets them). `n` requests are counted ('0': read only);
-- `gpc` is '' or a value to set gpc0 to. Appends PTTL and then, per counter in `spec` order,
-- the fields w, c, p for a rate or the value for a plain counter (nil when absent).
local function table_op(key, expire, n, gpc, spec, out)
  local fields = {}
  local wrote = false
  for tok in string.gmatch(spec, '%S+') do
    local c = string.sub(tok, 1, 1)
    local period = tonumber(string.sub(tok, 2))
    if period then
      if c == 'r' and n ~= '0' then
        window_add(key, c, math.floor(now / period), n)
        wrote = true
      end
      fields[#fields + 1] = c .. 'w'
      fields[#fields + 1] = c .. 'c'
      fields[#fields + 1] = c .. 'p'
    else
      if c == 'R' and n ~= '0' then
        incr(key, c, n)
        wrote = true
      end
      fields[#fields + 1] = c
    end
  end
  if gpc ~= '' then
    redis.call('HSET', key, 'g', gpc)
    wrote = true
  end
  if n ~= '0' or gpc ~= '' then
    if not wrote then
      -- The table counts nothing on a request (it stores only errors, bytes or gpc0): the
      -- entry still starts to exist, as Table::record_request creates it.
      redis.call('HSETNX', key, '_', '1')
    end
    redis.call('PEXPIRE', key, expire)
  end
  out[#out + 1] = redis.call('PTTL', key)
  if #fields > 0 then
    local v = redis.call('HMGET', key, unpack(fields))
    for i = 1, #fields do
      out[#out + 1] = v[i]
    end
  end
end

local mode = ARGV[1]
local out = { tonumber(time[1]), tonumber(time[2]) }

if mode == 'c' then
  -- ARGV: 'c', table count T, then 4 per table (expire ms, requests, gpc, spec), then the
  -- plan ('0'; or '1' and 5 numbers; or 'L', the same 5 and a lease of n tokens: n·T as a
  -- pair, and n), then the quota ('0', or '1' and 3 numbers).
  -- KEYS: the T table entries, then the plan bucket if any, then the quota if any.
  -- A lease takes n tokens (and n units of the quota) instead of the request's cost when
  -- both have room for n; otherwise the request's own cost is checked as without one. The
  -- reply then ends with 1 when the lease was taken, 0 when not.
  local tables = tonumber(ARGV[2])
  local a = 3
  for i = 1, tables do
    table_op(KEYS[i], ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], out)
    a = a + 4
  end
  local k = tables + 1

  -- GCRA. Time is in units of 1/D microsecond, written as a pair (whole µs, fraction < D) so
  -- that both parts stay exact: cost·T is (q, r), burst·T is (cq, cr). The bucket's state is
  -- the theoretical arrival time, stored as the string '<µs> <fraction>'.
  local plan_mode = ARGV[a]
  local plan = plan_mode ~= '0'
  local plan_key, p_ok, sa, sf, na, nf, costs
  local lease_n, lease_ok, la, lf
  a = a + 1
  if plan then
    plan_key = KEYS[k]
    k = k + 1
    local q, r = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
    local cq, cr, d = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
    a = a + 5
    local lq, lr
    if plan_mode == 'L' then
      lq, lr, lease_n = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), ARGV[a + 2]
      a = a + 3
    end
    costs = q > 0 or r > 0
    -- start = max(tat, now)
    sa, sf = now, 0
    local v = redis.call('GET', plan_key)
    if v then
      local ta, tf = string.match(v, '^(%d+) (%d+)$')
      ta, tf = tonumber(ta), tonumber(tf)
      if ta and tf then
        if tf >= d then
          tf = d - 1 -- the rate changed under a live bucket: keep the whole microseconds
        end
        if ta > now or (ta == now and tf > 0) then
          sa, sf = ta, tf
        end
      end
    end
    -- tat' = start + cost·T; admitted if tat' - now <= burst·T
    na, nf = sa + q, sf + r
    if nf >= d then
      na, nf = na + 1, nf - d
    end
    local used = na - now
    p_ok = used < cq or (used == cq and nf <= cr)
    if lq then
      -- The same test for n tokens.
      la, lf = sa + lq, sf + lr
      if lf >= d then
        la, lf = la + 1, lf - d
      end
      local lused = la - now
      lease_ok = lused < cq or (lused == cq and lf <= cr)
    end
  end

  -- Quota: the period's use, taken only if it fits.
  local quota = ARGV[a] == '1'
  local quota_key, q_ok, q_cost, q_used, q_expire_at
  a = a + 1
  if quota then
    quota_key = KEYS[k]
    q_cost, q_expire_at = ARGV[a], ARGV[a + 2]
    q_used = tonumber(redis.call('GET', quota_key) or '0')
    q_ok = q_used + tonumber(q_cost) <= tonumber(ARGV[a + 1])
    if lease_ok then
      lease_ok = q_used + tonumber(lease_n) <= tonumber(ARGV[a + 1])
    end
  end
  if lease_ok then
    -- n fits, so the request's own cost fits too: take n instead.
    na, nf, costs = la, lf, true
    if quota then
      q_cost = lease_n
    end
  end

  -- The plan's cost and the quota's are taken together or not at all.
  local admit = (not plan or p_ok) and (not quota or q_ok)
  if plan then
    local taken = admit and costs
    if taken then
      set_tat(plan_key, na, nf)
    end
    out[#out + 1] = p_ok and 1 or 0
    out[#out + 1] = taken and 1 or 0
    out[#out + 1] = sa - now
    out[#out + 1] = sf
  end
  if quota then
    local taken = admit and q_cost ~= '0'
    if taken then
      q_used = redis.call('INCRBY', quota_key, q_cost)
      redis.call('PEXPIREAT', quota_key, q_expire_at)
    end
    out[#out + 1] = q_ok and 1 or 0
    out[#out + 1] = taken and 1 or 0
    out[#out + 1] = q_used
  end
  if plan_mode == 'L' then
    out[#out + 1] = (lease_ok and admit) and 1 or 0
  end
  return out
elseif mode == 'r' then
  -- ARGV: 'r', then per key: 'p' and k·T as a pair and d, for k tokens of a plan bucket to
  -- give back; or 'q' and k, for k units of a quota period. KEYS: those buckets and periods.
  -- A bucket gives back at most down to full (tat = now); a quota down to 0.
  local a = 2
  for i = 1, #KEYS do
    local key = KEYS[i]
    if ARGV[a] == 'p' then
      local q, r, d = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
      a = a + 4
      local v = redis.call('GET', key)
      local ta, tf
      if v then
        ta, tf = string.match(v, '^(%d+) (%d+)$')
        ta, tf = tonumber(ta), tonumber(tf)
      end
      if ta and tf then
        if tf >= d then
          tf = d - 1
        end
        ta, tf = ta - q, tf - r
        if tf < 0 then
          ta, tf = ta - 1, tf + d
        end
        if ta < now or (ta == now and tf == 0) then
          redis.call('DEL', key)
        else
          set_tat(key, ta, tf)
        end
      end
    else
      local back = tonumber(ARGV[a + 1])
      a = a + 2
      local used = tonumber(redis.call('GET', key) or '0')
      if back > used then
        back = used
      end
      if back > 0 then
        redis.call('DECRBY', key, int(back))
      end
    end
  end
  out[#out + 1] = #KEYS
  return out
elseif mode == 'T' then
  -- ARGV: 'T', expire ms, '+' or '-', a tag, the most tags an entry holds. KEYS[1]: the
  -- entry. Its tags are field 'T', separated by spaces (a tag has none). Appends 1 when the
  -- tag was added or removed, 0 when it already was (or was not) there, -1 when the entry
  -- holds the most tags already.
  local key, op, tag, max = KEYS[1], ARGV[3], ARGV[4], tonumber(ARGV[5])
  local kept, found = {}, false
  for t in string.gmatch(redis.call('HGET', key, 'T') or '', '%S+') do
    if t == tag then
      found = true
    else
      kept[#kept + 1] = t
    end
  end
  local result = 0
  if op == '+' and not found then
    if #kept >= max then
      result = -1
    else
      kept[#kept + 1] = tag
      result = 1
    end
  elseif op == '-' and found then
    result = 1
  end
  if result == 1 then
    if #kept > 0 then
      redis.call('HSET', key, 'T', table.concat(kept, ' '))
    else
      redis.call('HDEL', key, 'T')
    end
    redis.call('PEXPIRE', key, ARGV[2])
  end
  out[#out + 1] = result
  return out
elseif mode == 'f' then
  -- ARGV: 'f', then 8 per key: expire ms, errors, http_err_rate period µs ('0': not stored),
  -- http_err_cnt stored ('1'/'0'), bytes in, bytes_in_rate period, bytes out,
  -- bytes_out_rate period. KEYS: the table entries.
  local a = 2
  for i = 1, #KEYS do
    local key = KEYS[i]
    local errors, err_period = ARGV[a + 1], tonumber(ARGV[a + 2])
    local bytes_in, in_period = ARGV[a + 4], tonumber(ARGV[a + 5])
    local bytes_out, out_period = ARGV[a + 6], tonumber(ARGV[a + 7])
    if errors ~= '0' then
      if err_period > 0 then
        window_add(key, 'e', math.floor(now / err_period), errors)
      end
      if ARGV[a + 3] == '1' then
        incr(key, 'E', errors)
      end
    end
    if bytes_in ~= '0' and in_period > 0 then
      window_add(key, 'i', math.floor(now / in_period), bytes_in)
    end
    if bytes_out ~= '0' and out_period > 0 then
      window_add(key, 'o', math.floor(now / out_period), bytes_out)
    end
    redis.call('PEXPIRE', key, ARGV[a])
    a = a + 8
  end
  out[#out + 1] = #KEYS
  return out
end
return redis.error_reply('portcullis limits: unknown mode ' .. tostring(mode))
