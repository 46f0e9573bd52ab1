variable "name" {
  type        = string
  description = "Prefix for the load balancer and target group names."

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,18}[a-z0-9]$", var.name))
    error_message = "name must be 3-20 characters of lowercase letters, digits and hyphens, starting with a letter."
  }
}

variable "vpc_id" {
  type        = string
  description = "VPC of the target group."
}

variable "subnet_ids" {
  type        = list(string)
  description = "Public subnets in at least two availability zones."

  validation {
    condition     = length(var.subnet_ids) >= 2
    error_message = "subnet_ids must list at least two subnets in different availability zones (an application load balancer requires two)."
  }
}

variable "security_group_id" {
  type        = string
  description = "Security group of the load balancer."
}

variable "instance_ids" {
  type        = list(string)
  description = "GPU hosts registered as targets."

  validation {
    condition     = length(var.instance_ids) >= 1
    error_message = "instance_ids must list at least one instance."
  }
}

variable "domain_name" {
  type        = string
  description = "Name the API is served under, such as api.example.com; the TLS certificate is for this name."

  validation {
    condition     = can(regex("^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\\.)+[a-z]{2,63}$", var.domain_name))
    error_message = "domain_name must be a lowercase DNS name such as api.example.com."
  }
}

variable "certificate_arn" {
  type        = string
  description = "Existing ACM certificate for domain_name. When null, a certificate is requested and validated through route53_zone_id."
  default     = null

  validation {
    condition     = var.certificate_arn == null || can(regex("^arn:aws[a-z-]*:acm:[a-z0-9-]+:[0-9]{12}:certificate/.+$", var.certificate_arn))
    error_message = "certificate_arn must be null or an ACM certificate ARN (arn:aws:acm:REGION:ACCOUNT:certificate/ID)."
  }
}

variable "route53_zone_id" {
  type        = string
  description = "Route53 hosted zone that holds domain_name; used to validate the requested certificate."
  default     = null

  validation {
    condition     = var.certificate_arn != null || var.route53_zone_id != null
    error_message = "route53_zone_id must be set when certificate_arn is null: the requested ACM certificate is validated through DNS records in that zone."
  }
}

variable "enable_deletion_protection" {
  type        = bool
  description = "Refuse to delete the load balancer until this is turned off (production)."
  default     = false
}

variable "idle_timeout_seconds" {
  type        = number
  description = "Seconds a connection may sit without bytes before the load balancer closes it; must exceed the longest non-streamed completion."
  default     = 300

  validation {
    condition     = var.idle_timeout_seconds >= 60 && var.idle_timeout_seconds <= 4000
    error_message = "idle_timeout_seconds must be between 60 and 4000 (the load balancer's maximum)."
  }
}

variable "deregistration_delay_seconds" {
  type        = number
  description = "Seconds a host leaving the target group keeps its in-flight requests; cover the gateway's drain timeout."
  default     = 60

  validation {
    condition     = var.deregistration_delay_seconds >= 0 && var.deregistration_delay_seconds <= 3600
    error_message = "deregistration_delay_seconds must be between 0 and 3600."
  }
}
