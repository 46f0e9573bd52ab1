variable "name" {
  type        = string
  description = "Prefix for resource names and the Name tag."

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,18}[a-z0-9]$", var.name))
    error_message = "name must be 3-20 characters of lowercase letters, digits and hyphens, starting with a letter."
  }
}

variable "vpc_cidr" {
  type        = string
  description = "IPv4 range of the VPC; each availability zone gets a public /24 of it (and a private one with create_private_subnets)."
  default     = "10.42.0.0/16"

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0)) && try(tonumber(split("/", var.vpc_cidr)[1]) >= 16 && tonumber(split("/", var.vpc_cidr)[1]) <= 22, false)
    error_message = "vpc_cidr must be an IPv4 CIDR with a prefix between /16 and /22, for example 10.42.0.0/16."
  }
}

variable "availability_zones" {
  type        = list(string)
  description = "Exactly two availability zones (names such as us-east-1a) that offer the GPU instance type; one public subnet each."

  validation {
    condition     = length(var.availability_zones) == 2 && length(distinct(var.availability_zones)) == 2
    error_message = "availability_zones must list exactly two different zones (an ALB needs two; more adds cost without use here)."
  }
}

variable "create_private_subnets" {
  type        = bool
  description = "Also create one private subnet per availability zone (no route out of the VPC), for the shared cache."
  default     = false
}

variable "enable_flow_logs" {
  type        = bool
  description = "Send VPC flow logs (all traffic) to a CloudWatch log group."
  default     = false
}

variable "flow_logs_retention_days" {
  type        = number
  description = "How long CloudWatch keeps the flow logs, in days (a value CloudWatch accepts)."
  default     = 365

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.flow_logs_retention_days)
    error_message = "flow_logs_retention_days must be one of CloudWatch's values: 1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288 or 3653."
  }
}
