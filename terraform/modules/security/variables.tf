variable "name" {
  type        = string
  description = "Prefix for security group names."

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,18}[a-z0-9]$", var.name))
    error_message = "name must be 3-20 characters of lowercase letters, digits and hyphens, starting with a letter."
  }
}

variable "vpc_id" {
  type        = string
  description = "VPC the security groups belong to."
}

variable "admin_cidrs" {
  type        = list(string)
  description = "Networks allowed to reach SSH (22), for example your office or VPN egress as 203.0.113.7/32. There is no default: SSH is never open to the world."

  validation {
    condition     = length(var.admin_cidrs) > 0 && alltrue([for c in var.admin_cidrs : can(cidrhost(c, 0))])
    error_message = "admin_cidrs must list at least one network in CIDR form, for example [\"203.0.113.7/32\"]."
  }

  validation {
    # a /0 (or anything nearly as wide) is the whole internet in practice
    condition = alltrue([
      for c in var.admin_cidrs : try(tonumber(split("/", c)[1]) >= (strcontains(c, ":") ? 32 : 8), false)
    ])
    error_message = "admin_cidrs must not open SSH to the world: 0.0.0.0/0, ::/0 and any IPv4 range wider than /8 (IPv6 wider than /32) are refused. Give your own address, for example 203.0.113.7/32."
  }
}

variable "api_allowed_cidrs" {
  type        = list(string)
  description = "Networks allowed to call the HTTPS API (443). The API is protected by keys, so the default is everyone."
  default     = ["0.0.0.0/0"]

  validation {
    condition     = length(var.api_allowed_cidrs) > 0 && alltrue([for c in var.api_allowed_cidrs : can(cidrhost(c, 0))])
    error_message = "api_allowed_cidrs must list at least one network in CIDR form, for example [\"0.0.0.0/0\"] or [\"198.51.100.0/24\"]."
  }
}

variable "metrics_ports" {
  type        = map(number)
  description = "Metrics ports on the GPU hosts that only members of the monitoring security group may reach, by name: the exporters, and nginx's metrics listener (metrics_listener, the Ansible nginx_metrics_port) through which a Prometheus on another host scrapes the gateway and vLLM."
  default = {
    node_exporter    = 9100
    dcgm_exporter    = 9400
    metrics_listener = 9180
  }

  validation {
    # 22 and 443 have their own rules; 8000-8099 are the gateway (8080) and the vLLM servers,
    # which bind to loopback and must never be reachable past nginx and the API keys
    condition = alltrue([
      for p in values(var.metrics_ports) : p >= 1024 && p <= 65535 && floor(p) == p && !(p >= 8000 && p <= 8099)
    ])
    error_message = "metrics_ports must be whole ports from 1024 to 65535, outside 8000-8099 (the gateway on 8080 and vLLM on 8000+ are never exposed)."
  }
}

variable "create_load_balancer_group" {
  type        = bool
  description = "Create the load balancer's security group; the hosts then accept HTTPS from the load balancer only."
  default     = false
}
