-- A different prediction request every time, so the gateway's cache never answers it.
-- customer_id = BENCH_PREFIX-<thread>-<n> is unique per request (a new cache key, and the
-- sticky 90/10 split sends ~10% of customers to the challenger arm, churn_gbm_v2);
-- monthly_charges = (n mod 20000) / 100, tenure_months = BENCH_TENURE (default 24).
-- Used for the cache-miss case (c), the degraded case (e) and the soak.
package.path = os.getenv("BENCH_WRK_DIR") .. "/?.lua;" .. package.path
local report = require("report")

local prefix = os.getenv("BENCH_PREFIX") or "bench"
local tenure = tonumber(os.getenv("BENCH_TENURE") or "24")
local headers = { ["Content-Type"] = "application/json" }
local threads = 0
local n = 0

function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

function request()
  n = n + 1
  local body = string.format(
    '{"model_id":"customer-churn","features":{"customer_id":"%s-%d-%d",' ..
    '"tenure_months":%d,"monthly_charges":%.2f}}',
    prefix, tid or 0, n, tenure, (n % 20000) / 100)
  return wrk.format("POST", "/v1/predictions", headers, body)
end

done = report.done
