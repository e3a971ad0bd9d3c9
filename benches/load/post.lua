-- wrk script: POST JSON bodies read from files named after `--`.
--   wrk -t1 -c32 -d5s --latency -s post.lua http://127.0.0.1:PORT/bench -- body1.json [body2.json ...]
-- One file: a static request (wrk formats it once, no Lua per request).
-- Several files: a request() that cycles through the pre-formatted requests.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local function slurp(path)
  local f = assert(io.open(path, "rb"))
  local data = f:read("*a")
  f:close()
  return data
end

function init(args)
  -- args[0] is the URL, the files follow.
  local files = {}
  for k = 1, #args do
    files[k] = args[k]
  end
  if #files == 0 then
    error("post.lua: name at least one body file after --")
  elseif #files == 1 then
    wrk.body = slurp(files[1])
  else
    local requests = {}
    for n, path in ipairs(files) do
      requests[n] = wrk.format(nil, nil, nil, slurp(path))
    end
    local i = 0
    local count = #requests
    request = function()
      i = i % count + 1
      return requests[i]
    end
  end
end
