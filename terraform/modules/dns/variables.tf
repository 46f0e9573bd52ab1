variable "zone_id" {
  type        = string
  description = "Route53 hosted zone that holds record_name."

  validation {
    condition     = can(regex("^Z[A-Z0-9]{1,31}$", var.zone_id))
    error_message = "zone_id must be a Route53 hosted zone ID such as Z0123456789ABCDEFGHIJ."
  }
}

variable "record_name" {
  type        = string
  description = "Fully qualified name of the API, such as api.example.com."

  validation {
    condition     = can(regex("^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\\.)+[a-z]{2,63}$", var.record_name))
    error_message = "record_name must be a lowercase DNS name such as api.example.com."
  }
}

variable "use_alias" {
  type        = bool
  description = "Point the name at a load balancer (alias_name/alias_zone_id) instead of at addresses."
  default     = false
}

variable "alias_name" {
  type        = string
  description = "DNS name of the load balancer; used when use_alias is true."
  default     = null

  validation {
    condition     = !var.use_alias || var.alias_name != null
    error_message = "alias_name must be set when use_alias is true."
  }
}

variable "alias_zone_id" {
  type        = string
  description = "Hosted zone of the load balancer; used when use_alias is true."
  default     = null

  validation {
    condition     = !var.use_alias || var.alias_zone_id != null
    error_message = "alias_zone_id must be set when use_alias is true."
  }
}

variable "addresses" {
  type        = list(string)
  description = "IPv4 addresses of the host(s); used when use_alias is false."
  default     = []

  validation {
    condition     = var.use_alias || length(var.addresses) >= 1
    error_message = "addresses must list at least one IPv4 address when use_alias is false."
  }
}

variable "ttl_seconds" {
  type        = number
  description = "TTL of the address record in seconds."
  default     = 300

  validation {
    condition     = var.ttl_seconds >= 30 && var.ttl_seconds <= 86400
    error_message = "ttl_seconds must be between 30 and 86400."
  }
}
