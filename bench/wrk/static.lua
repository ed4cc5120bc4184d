-- One fixed POST, built once by wrk: BENCH_PATH, BENCH_BODY (JSON) from the environment.
-- Used for direct Triton (a), nginx (b) and the gateway's cache-hit case (d).
package.path = os.getenv("BENCH_WRK_DIR") .. "/?.lua;" .. package.path
local report = require("report")

wrk.method = "POST"
wrk.path = os.getenv("BENCH_PATH")
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"

done = report.done
