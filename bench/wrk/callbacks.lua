-- wrk script for bench/run.sh --load wrk: every request is a different
-- group read receipt (Group.CallbackAfterReadReceipt, 2 items), so the
-- gateway's dedup window never answers one without spooling and publishing
-- it. Unsigned app (no Sign to compute in Lua). Each request's GroupId
-- carries the run id, the wrk thread's number and a per-thread counter, and
-- its MsgSeqs follow the counter: no two requests of any run share an event.
--
--   wrk -t1 -c32 -d6s -s bench/wrk/callbacks.lua http://127.0.0.1:PORT/callback -- RUN_ID APP_ID
--
-- done() prints one line `WRK_RESULT {json}` with the count of 200s (every
-- one of which must have put 2 records in Kafka) and of everything else.

local threads = {}
local next_id = 0

function setup(thread)
   next_id = next_id + 1
   thread:set("id", next_id)
   table.insert(threads, thread)
end

local run, app, path
local counter = 0
-- Globals, not locals: done() runs in another Lua state and reads them
-- with thread:get(), which sees only globals.
ok, bad = 0, 0
local headers = { ["Content-Type"] = "application/json" }

function init(args)
   run = args[1] or tostring(os.time())
   app = args[2] or "1400000002"
   path = wrk.path .. "?SdkAppid=" .. app
      .. "&CallbackCommand=Group.CallbackAfterReadReceipt"
      .. "&contenttype=json&ClientIP=127.0.0.1&OptPlatform=iOS"
end

function request()
   counter = counter + 1
   local seq = counter * 2
   local body = string.format(
      '{"CallbackCommand":"Group.CallbackAfterReadReceipt","GroupId":"@TGS#%sw%dx%d","Type":"Public",'
      .. '"GroupMsgReceiptList":['
      .. '{"MsgSeq":%d,"ReadNum":1,"UnreadNum":40,"ReadReceiptMembers":[{"Member_Account":"user%d"}]},'
      .. '{"MsgSeq":%d,"ReadNum":2,"UnreadNum":39,"ReadReceiptMembers":[{"Member_Account":"user%d"}]}'
      .. '],"EventTime":"%d"}',
      run, id, counter, seq - 1, counter % 1000, seq, (counter + 1) % 1000, os.time() * 1000)
   return wrk.format("POST", path, headers, body)
end

function response(status, headers, body)
   if status == 200 then
      ok = ok + 1
   else
      bad = bad + 1
   end
end

function done(summary, latency, requests)
   local ok_total, bad_total = 0, 0
   for _, t in ipairs(threads) do
      ok_total = ok_total + t:get("ok")
      bad_total = bad_total + t:get("bad")
   end
   local e = summary.errors
   io.write(string.format(
      'WRK_RESULT {"ok":%d,"not_ok":%d,"responses":%d,"duration_us":%d,'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"latency_ms":{"p50":%.3f,"p99":%.3f,"max":%.3f}}\n',
      ok_total, bad_total, summary.requests, summary.duration,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
